"""The check that runs before the evaluation: do much stronger attacks find more?

An unconverged PGD-20 is the failure that matters most (its robust accuracy is then only an upper
bound), and a check that runs after the evaluation can only report it. So before the Trainer
runs, :func:`more_steps_preflight` attacks a seeded sample of the split (64 images) at the largest
radius with the mounted attacks (their per-sample worst case, as the report computes it) and with
PGD of 5x the steps and 2 more restarts on the task loss and the C&W margin
(:func:`~lightning_modules.evaluation.honesty.stronger_pgd`). The images the stronger attacks
fool and the mounted ones counted robust get a second draw of the mounted attacks (fresh random
starts); when more than one image survives it too, the check fails and the stronger attacks join
the evaluation: rows ``pgd_strong`` and ``pgd_strong_cw`` at every radius, inside the worst case
(with the cascade, only on the images still robust). The outcome is kept in
``<report dir>/preflight.json``: a resumed run, and every DDP rank after rank 0, reuse it, so all
build the same grid.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.attacks import PGD, Attack
from lightning_modules.attacks.mode import attack_mode
from lightning_modules.core.io import write_json
from lightning_modules.core.tasks import Task
from lightning_modules.evaluation.engine import RobustEvaluator
from lightning_modules.evaluation.honesty import (
    Check,
    attack_kind,
    more_steps_check,
    stronger_pgd,
)

__all__ = ["more_steps_preflight", "reference_pgd"]

log = logging.getLogger(__name__)

PROBE_IMAGES = 64


def reference_pgd(attacks: dict[str, Attack]) -> PGD | None:
    """The mounted untargeted PGD on the task loss (the report's reference white-box attack)."""
    return next((a for a in attacks.values() if isinstance(a, PGD)
                 and attack_kind(a.describe()) == "pgd"), None)


def _device(trainer_cfg: Any) -> torch.device:
    accelerator = str((trainer_cfg or {}).get("accelerator", "auto"))
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def more_steps_preflight(net: nn.Module, attacks: dict[str, Attack], eps: float, task: str,
                         num_classes: int, cascade: bool, datamodule: Any, split: str,
                         seed: int, out_dir: Path, trainer_cfg: Any
                         ) -> tuple[Check | None, dict[str, Attack]]:
    """``(the more_steps_never_help check, the stronger attacks to add)``; no check (``None``)
    without an untargeted PGD mounted or a radius above 0."""
    reference = reference_pgd(attacks)
    if reference is None or eps <= 0:
        return None, {}
    stronger = stronger_pgd(reference, Task(task))
    key = {"eps": eps, "seed": seed, "split": split,
           "attacks": {n: a.describe() for n, a in attacks.items()}}
    key = json.loads(json.dumps(key, default=str))
    path = out_dir / "preflight.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key:  # a resumed run, or a DDP rank after rank 0
        check = Check(**saved["check"])
        log.info("preflight reused from %s: %s", path, check.detail)
        return check, ({} if check.passed else stronger)
    cells = {n: a.with_eps(eps) for n, a in attacks.items() if a.norm == reference.norm
             and Task(task).name in a.tasks}
    device = _device(trainer_cfg)
    net = net.to(device)
    try:
        # eval mode throughout (put back after): in train mode the clean and adversarial
        # forward passes would use batch statistics and move BatchNorm's running statistics,
        # i.e. change the model that the evaluation afterwards reports on
        with attack_mode(net, "eval"):
            datamodule.prepare_data()
            datamodule.setup("test" if split == "test" else "validate")
            x, y = next(iter(datamodule.sample_loader(split, PROBE_IMAGES, PROBE_IMAGES, seed)))
            x, y = x.to(device), y.to(device)
            many = len(cells) > 1
            evaluator = RobustEvaluator(task, num_classes, cells,
                                        worst_case={"worst": list(cells)} if many else None,
                                        cascade=cascade and many)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = evaluator.attack_batch(net, x, y)
                worst = out.worst["worst"] if many else next(iter(out.adv.values()))
                t = Task(task)
                reported_robust = ~t.wrong(out.clean, y) & ~t.wrong(worst, y)

                def redraw(mask: torch.Tensor) -> torch.Tensor:
                    torch.manual_seed(seed + 1)
                    again = evaluator.attack_batch(net, x[mask], y[mask])
                    adv = again.worst["worst"] if many else next(iter(again.adv.values()))
                    return ~t.wrong(again.clean, y[mask]) & ~t.wrong(adv, y[mask])

                check, _ = more_steps_check(net, x, y, t, reported_robust, " + ".join(cells),
                                            {n: a.with_eps(eps) for n, a in stronger.items()},
                                            redraw=redraw)
    finally:
        net.to("cpu")
    if _rank() == 0:
        write_json(path, {"key": key, "check": check.as_dict()})
    if not check.passed:
        log.warning("honesty check failed before the evaluation: %s", check.detail)
    return check, ({} if check.passed else stronger)
