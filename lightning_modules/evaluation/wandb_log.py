"""An evaluation report sent to the loggers: scalars to each; with wandb also the tables,
figures and ``report.json`` as an artifact, on the training run when it can be found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightning_modules.core.config import instantiate_node

__all__ = ["log_report"]


def log_report(cfg: DictConfig, report: dict[str, Any], out_dir: Path) -> None:
    """Send the report to the configured loggers (``logger=wandb|csv|tensorboard``): scalars
    ``eval/<attack>@<eps>/<metric>`` to each; with wandb also the results table, the plot, the
    checks and ``report.json`` as an artifact, on the training run when its wandb folder lies
    beside the checkpoint (resumed by id), else on a new run grouped by the training run."""
    node = cfg.get("logger")
    if not node:
        return
    run_dir = Path(report["checkpoint"]).parent.parent
    scalars = {f"eval/clean/{k}": v for k, v in report["clean"].items()}
    scalars.update({f"eval/{r['attack']}@{r['eps_str']}/{k}": v for r in report["results"]
                    for k, v in r.items() if isinstance(v, float) and k not in ("eps", "seconds")})
    for key in node:
        target = str(node[key].get("_target_", ""))
        extra: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            found = sorted(run_dir.glob("wandb/*run-*-*"))
            extra = {"name": f"eval-{report['defense']}-{Path(report['checkpoint']).stem}",
                     "save_dir": str(out_dir)}
            if found:  # attach to the training run
                extra.update(id=found[-1].name.rsplit("-", 1)[-1], resume="allow")
            else:
                extra.update(group=run_dir.name, job_type="eval")
        lg = instantiate_node(node, key, **extra)
        lg.log_metrics(scalars, step=0)
        if target.endswith("WandbLogger"):
            _wandb_panels(lg.experiment, report, out_dir)
        lg.finalize("success")
        if target.endswith("WandbLogger"):
            import wandb

            wandb.finish()  # always finished: multiruns never hang on an open run


def _wandb_panels(run, report: dict[str, Any], out_dir: Path) -> None:
    import wandb

    cols = ["attack", "norm", "eps_str", "steps", "restarts", "images_attacked", "seconds",
            *report["clean"]]
    clean = {"attack": "clean", "eps_str": "0", **report["clean"]}
    run.log({
        "eval/results": wandb.Table(columns=cols, data=[[r.get(c) for c in cols]
                                                        for r in [clean, *report["results"]]]),
        "eval/checks": wandb.Table(columns=["check", "passed", "detail"],
                                   data=[[c["check"], c["passed"], c["detail"]]
                                         for c in report["checks"]]),
        "eval/metric_vs_eps": wandb.Image(str(out_dir / "accuracy_vs_eps.png")),
    })
    run.summary.update({"eval/n_images": report["n_images"],
                        "eval/failed_checks": sum(not c["passed"] for c in report["checks"])})
    panels: dict[str, Any] = {}
    for block, folder in (("analyses", "analyses"), ("corruptions", "corruptions")):
        for key, name in ((report.get(block) or {}).get("files") or {}).items():
            panels[f"eval/{block}/{key}"] = wandb.Image(str(out_dir / folder / name))
    cor = report.get("corruptions")
    if cor:
        score = cor["score_metric"]
        sevs = [str(s) for s in cor["severities"]]
        panels["eval/corruptions/table"] = wandb.Table(
            columns=["corruption", *[f"severity {s}" for s in sevs], "mean", "drop"],
            data=[[c, *[by[s][score] for s in sevs], cor["per_corruption"][c]["score"],
                   cor["per_corruption"][c]["drop"]] for c, by in cor["table"].items()])
        run.summary.update({f"eval/corruptions/mean_{score}": cor["mean"]["score"],
                            **({"eval/corruptions/mCE": cor["baseline"]["mce"]}
                               if cor.get("baseline") else {}),
                            **({"eval/flip_probability": cor["flip_probability"]["mean"]}
                               if cor.get("flip_probability") else {})})
    ana = report.get("analyses") or {}
    if ana.get("feature_distance"):
        panels["eval/analyses/feature_distance_table"] = wandb.Table(
            columns=["attack", *next(iter(ana["feature_distance"].values()))],
            data=[[a, *d.values()] for a, d in ana["feature_distance"].items()])
    if panels:
        run.log(panels)
    artifact = wandb.Artifact(f"eval-report-{run.id}", type="evaluation")
    artifact.add_file(str(out_dir / "report.json"))
    run.log_artifact(artifact)
