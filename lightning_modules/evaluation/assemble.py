"""One evaluation's :class:`EvalReport` put together from what ran (the module's rows and
costs, the checkpoint's training config, the trainer), and its honesty checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.attacks import Attack, AutoAttack, FastAttack
from lightning_modules.core.config import instantiate_node
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tasks import SCORE_METRIC, Task, chance_level
from lightning_modules.core.threat import format_eps
from lightning_modules.evaluation.certify import Certifier
from lightning_modules.evaluation.honesty import (
    Check,
    attack_kind,
    certify_checks,
    failed,
    model_checks,
    probe_checks,
    report_checks,
)
from lightning_modules.evaluation.module import EvaluationModule
from lightning_modules.evaluation.preflight import reference_pgd
from lightning_modules.evaluation.schema import EvalReport, software_versions
from lightning_modules.evaluation.writer import cost_table

__all__ = ["assemble_report", "build_certifier", "honesty_checks", "stop_if_failed"]

log = logging.getLogger(__name__)


def assemble_report(ckpt_path: str, ckpt: dict, train_cfg: DictConfig, task: str,
                    num_classes: int, module: EvaluationModule, trainer: Any, attacks: dict[str, Attack], skipped: dict[str, str],
                    eps_grid: list[float], threat: dict[str, Any], options: Any, split: str,
                    n_split: int | None, class_names: list[str] | None, cascade: bool,
                    gap_info: dict[str, dict]) -> EvalReport:
    """The report of one checkpoint; rows come from the module's typed cells."""
    return EvalReport(
        checkpoint=str(Path(ckpt_path).resolve()),
        epoch=ckpt.get("epoch"),
        dataset=train_cfg.datamodule.get("_target_"),
        backbone=train_cfg.backbone.get("name", train_cfg.backbone.get("_target_")),
        defense=train_cfg.defense.get("name", train_cfg.defense.get("_target_")),
        train_threat=OmegaConf.to_container(train_cfg.get("threat", {}), resolve=True),
        task=task, num_classes=num_classes, class_names=class_names,
        score_metric=SCORE_METRIC[task],
        chance={SCORE_METRIC[task]: chance_level(task, num_classes)},
        split=split, n_images=module.n_images,
        subset=None if n_split is None else
        f"{module.n_images} of {n_split} (seeded, class-stratified)",
        threat_model={"norm": sorted({a.norm for a in attacks.values()}),
                      "eps_grid": [format_eps(e) for e in eps_grid],
                      "source": threat["source"], "note": threat["note"]},
        evaluation=options.get("name"),
        precision=str(trainer.precision), devices=trainer.world_size,
        clean=module.results["clean"],
        attacks={name: atk.describe() for name, atk in attacks.items()},
        skipped_attacks=skipped, cascade=cascade,
        cost=cost_table(module.cost, module.n_images),
        gap=gap_info or None,
        worst_case=dict(module.evaluator.worst_case) or None,
        results=module.rows(), software=software_versions(), resumed_batches=module.resumed)


def build_certifier(options: Any, train_cfg: DictConfig, task: str
                    ) -> tuple[Certifier | None, str | None]:
    """``evaluation.certify``'s :class:`Certifier` (or ``None``) and where its sigma came from:
    ``evaluation.certify.sigma``, else the checkpoint's ``defense.sigma``."""
    node = options.get("certify")
    if node is None:
        return None, None
    if task != "multiclass":
        raise ConfigError(f"evaluation=certify is single-label (the certificate is about the "
                          f"argmax class); the checkpoint is {task}")
    sigma, source = node.get("sigma"), "evaluation.certify.sigma"
    if sigma is None:
        defense = train_cfg.get("defense") or {}
        sigma, source = defense.get("sigma"), "checkpoint (defense.sigma)"
        if sigma is None:
            raise ConfigError(f"evaluation.certify.sigma is null and the checkpoint's defense "
                              f"({defense.get('name', '?')}) stores no sigma: set "
                              "evaluation.certify.sigma (e.g. 0.25)")
    return instantiate_node(options, "certify", sigma=sigma), source


def honesty_checks(report: EvalReport, module: EvaluationModule, net: nn.Module,
                   attacks: dict[str, Attack], eps_grid: list[float], probes: bool,
                   before: list[Check] = ()) -> list[Check]:
    """The checks run ``before`` the evaluation (the stronger PGD of
    :mod:`~lightning_modules.evaluation.preflight`), the report's own checks, the model checks
    on the first batch, and with ``probes`` the attack probes (a huge eps, Square) against the
    untargeted PGD."""
    task = report.task
    metrics = ("acc", SCORE_METRIC[task]) if SCORE_METRIC[task] != "acc" else ("acc",)
    data = report.as_dict()
    # row name -> what its attack is (pgd: the untargeted PGD on the task loss)
    kinds = {name: "pgd-strong" if name.startswith("pgd_strong") else attack_kind(d)
             for name, d in (data["attacks"] or {}).items()}
    checks = list(before) + report_checks(
        data["clean"], data["results"], module.n_images, metrics, kinds,
        bounded=("acc", "bal_acc") if task == "multiclass" else (), cascade=report.cascade,
        cost=module.cost)
    if report.certify:
        checks += certify_checks(report.certify, n_images=module.n_images)
    if module.probe is None:  # a DDP rank whose shard held no batch
        return checks
    checks = checks + model_checks(net, *module.probe, Task(task))
    reference = reference_pgd(attacks)
    if probes and reference is not None and max(eps_grid) > 0:
        queries = min([1000] + [a.square_queries for a in attacks.values()
                                if isinstance(a, (AutoAttack, FastAttack))
                                and a.square_queries > 0])
        checks += probe_checks(net, *module.probe, Task(task), report.num_classes,
                               reference.with_eps(max(eps_grid)), square_queries=queries)
    for c in failed(checks):
        log.warning("honesty check failed: %s: %s", c.check, c.detail)
    return checks


def stop_if_failed(checks: list[Check], out_dir: Path) -> None:
    """``evaluation.strict=true``: a failed honesty check is an error (the report is kept)."""
    bad = failed(checks)
    if bad:
        raise ConfigError(f"evaluation.strict=true and {len(bad)} honesty check(s) failed: "
                          + "; ".join(f"{c.check} ({c.detail})" for c in bad)
                          + f"; report kept in {out_dir}")
