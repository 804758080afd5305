"""What a training run records and prints: the seeds it used, the images it skipped, and the
short results table at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.tasks import chance_level
from lightning_modules.core.threat import format_eps, parse_eps

__all__ = ["run_record", "seeds_used", "skipped_images", "summary_table"]


def seeds_used(cfg: DictConfig, seed: int, source: str) -> dict[str, Any]:
    """The seeds of this run, for ``seeds.json`` and ``metrics.json``: the run seed (from the
    config, the checkpoint resumed, or drawn when ``seed=null``), every other ``seed`` /
    ``*_seed`` key of the config, and how the rest derive from the run seed."""
    components: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if (k == "seed" or str(k).endswith("_seed")) and key != "seed" and \
                        (v is None or isinstance(v, int)):
                    components[key] = v
                else:
                    walk(v, key)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {
        "seed": int(seed),
        "seed_source": source,
        "seed_config": cfg.get("seed"),
        "deterministic": cfg.trainer.get("deterministic", False),
        "components": components,
        "derived": {
            "torch, numpy, python random": "seed (lightning.seed_everything, workers=True)",
            "dataloader workers": "torch base seed drawn per epoch + worker id (Lightning's "
                                  "pl_worker_init_function, datamodules.augment.seed_worker)",
            "augmentation (albumentations)": "torch.initial_seed() + DDP rank "
                                             "(datamodules.augment.build_augmentation)",
        },
        "torch_initial_seed": int(torch.initial_seed()),
    }


def skipped_images(datamodule) -> list[str]:
    """Unreadable images skipped during the run (datamodules that read files)."""
    fn = getattr(datamodule, "skipped_images", None)
    return fn() if fn is not None else []


def summary_table(result: dict[str, Any], loggers: list, out_dir: Path) -> str:
    """The short table printed at the end of a run."""
    atk = result["val_attack"]
    atk_name = f"{atk['attack'].upper()}-{atk.get('steps', 1)}" if atk["attack"] == "pgd" \
        else atk["attack"].upper()
    val = result.get("val_threat")  # the test attack's radius when it is not the training one
    eps = (val or result["threat"])["eps_str"]
    lines = [
        "",
        f"== medrobust: defense={result['defense']['defense']}  "
        f"threat={result['threat']['norm']} eps={result['threat']['eps_str']}"
        + (f" (tested at {val['norm']} {val['eps_str']})" if val else "")
        + f"  ({result['wall_time_s']:.0f} s) ==",
    ]
    test = result["test"]
    names = sorted({k.split("/", 1)[1] for k in test if not k.split("/", 1)[1].startswith("adv_")
                    and not k.endswith("loss")})
    if names:
        names.sort(key=lambda n: ("/" in n, n))  # summary metrics first, then per class
        width = max(14, 2 + max(len(n) for n in names))
        chance = result.get("chance", {})
        lines.append(f"{'test metric':<{width}}{'clean':>10}{atk_name + ' @ ' + eps:>22}"
                     f"{'chance':>9}")
        for name in names:
            clean = test.get(f"test/{name}")
            adv = test.get(f"test/adv_{name}")
            fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
            level = f"{chance[name]:>9.4f}" if name in chance else ""
            lines.append(f"{name:<{width}}{fmt(clean):>10}{fmt(adv):>22}{level}")
    else:
        lines.append("(no test metrics: test=false)")
    skipped = result.get("skipped_images") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[:3]}")
    sel = result["selection"]
    how = "the last epoch" if sel["criterion"] == "last" else \
        f"{sel['criterion']} validation score"
    lines.append(f"tested checkpoint: {sel['checkpoint'] or '-'} (epoch {sel['epoch']}, "
                 f"selected by {how}"
                 + ("; NO EPOCH WAS ELIGIBLE: last checkpoint)" if sel["fallback"] else ")"))
    lines.append(f"metrics JSON:      {out_dir / 'metrics.json'}")
    log_dirs = sorted({str(getattr(lg, 'log_dir', None) or getattr(lg, 'save_dir', '') or '')
                       for lg in loggers} - {""})
    lines.append(f"logs:              {', '.join(log_dirs) if log_dirs else str(out_dir)}")
    return "\n".join(lines)


def run_record(cfg: DictConfig, module, datamodule, seeds: dict, state_cb, test_metrics: dict,
               fit_metrics: dict, chosen: dict, checkpoints: dict, out_dir: Path,
               seconds: float) -> dict[str, Any]:
    """What ``metrics.json`` holds: the defense, the training threat (and the validation
    attack's when ``attack.*`` makes it differ), seeds, test and validation metrics, the
    checkpoint tested and why, the files and the wall time."""
    val_attack = module.val_attack
    threat = {"norm": str(cfg.threat.norm), "eps": parse_eps(cfg.threat.eps, "threat.eps")}
    threat["eps_str"] = format_eps(threat["eps"])
    return {
        "task_name": cfg.get("task_name"),
        "defense": module.defense.describe(),
        "val_attack": val_attack.describe(),
        "threat": threat,  # the training threat (conf/threat)
        # the validation/test attack's, when attack.* makes it differ from the training threat
        "val_threat": None if (val_attack.norm, val_attack.eps) == (threat["norm"], threat["eps"])
        else {"norm": val_attack.norm, "eps": val_attack.eps, "eps_str": format_eps(val_attack.eps)},
        "seed": cfg.get("seed"),
        "seeds": seeds,
        "resumes": list(state_cb.history) if state_cb is not None else [],
        "test": test_metrics,
        "val": {k: v for k, v in fit_metrics.items() if k.startswith("val/")},
        "chance": {module.score_key: chance_level(module.task_name, module.hparams.num_classes)},
        "selection": chosen,
        "best_checkpoint": chosen["checkpoint"],  # the checkpoint tested
        "checkpoints": checkpoints,
        "last_checkpoint": checkpoints.get("last", ""),
        "output_dir": str(out_dir),
        "skipped_images": skipped_images(datamodule),
        "wall_time_s": round(seconds, 1),
    }
