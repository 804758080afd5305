"""The LightningModule behind ``evaluate.py``: a trained network attacked over an eps grid.

It orchestrates; the work is done by :class:`~lightning_modules.robust_eval.RobustEvaluator`,
the engine the training module validates and tests with. Running it through a Lightning
``Trainer`` (built from the same ``trainer`` config group as training) gives device choice,
mixed precision, DDP with metrics reduced across ranks, limits and a progress bar. It needs
``Trainer(inference_mode=False)``: attacks need gradients.

Cells are named ``<attack>@<eps>`` (eps written as ``8/255``); with two or more attacks of one
norm, each radius above 0 also gets ``worst@<eps>``: the per-sample worst case over them
(``worst-<norm>@<eps>`` when attacks of several norms are mounted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from .attacks import Attack
from .robust_eval import EvalBatch, RobustEvaluator
from .utils import format_eps, to_memory_format

__all__ = ["EvaluationModule", "grid_cells"]

WORST = "worst"


def grid_cells(attacks: Mapping[str, Attack], eps_grid: Sequence[float]
               ) -> tuple[dict[str, Attack], dict[str, list[str]]]:
    """``({"<name>@<eps>": attack at eps}, {"worst@<eps>": [cell names]})`` for the grid.

    A worst case is taken only over attacks of one threat model: with attacks of several norms
    the groups are ``worst-<norm>@<eps>``, each over that norm's attacks."""
    if any(name.startswith(WORST) for name in attacks):
        raise ValueError(f"attack names starting with '{WORST}' are reserved for the worst case")
    norms = sorted({a.norm for a in attacks.values()})
    cells, worst = {}, {}
    for eps in eps_grid:
        for name, attack in attacks.items():
            cells[f"{name}@{format_eps(eps)}"] = attack.with_eps(eps)
        for norm in norms:
            names = [f"{n}@{format_eps(eps)}" for n, a in attacks.items() if a.norm == norm]
            if eps > 0 and len(names) > 1:
                label = WORST if len(norms) == 1 else f"{WORST}-{norm}"
                worst[f"{label}@{format_eps(eps)}"] = names
    return cells, worst


class EvaluationModule(L.LightningModule):
    """Args:
        net: the trained backbone (images in [0, 1] -> logits).
        task, num_classes: as in training.
        attacks: name -> attack; each is run at every radius of ``eps_grid``.
        eps_grid: radii in [0, 1] pixel units.
        channels_last: run in channels-last memory format (as the training run did).
        cascade: at each radius, each attack runs only on the images every earlier attack
            failed on (rows become cumulative; see :class:`RobustEvaluator`).
        resume_dir: keep each batch's logits and costs there (``rank<r>-batch<i>.pt``); a
            batch already saved with the same ``signature`` and labels is not attacked
            again, so a killed evaluation resumes (later batches draw fresh random starts).

    After ``trainer.test(...)`` or ``trainer.validate(...)``, :attr:`results` holds
    ``{kind: {metric: value}}`` (``clean``, each cell, each worst case) and :attr:`n_images`
    the number of images evaluated, :attr:`cost` each cell's seconds and images attacked, all
    reduced across ranks.
    """

    def __init__(self, net: nn.Module, task: str, num_classes: int,
                 attacks: Mapping[str, Attack], eps_grid: Sequence[float],
                 channels_last: bool = False, class_names: list[str] | None = None,
                 cascade: bool = False, resume_dir: Path | None = None,
                 signature: dict | None = None) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        self.cells, worst = grid_cells(attacks, eps_grid)
        self.evaluator = RobustEvaluator(task, num_classes, self.cells, worst_case=worst,
                                         per_class=True, cascade=cascade)
        self.class_names = class_names
        self.results: dict[str, dict[str, float]] = {}
        self.n_images = 0
        self.cost: dict[str, dict[str, float]] = {}
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # first batch (checks)
        self.resume_dir = None if resume_dir is None else Path(resume_dir)
        self.signature = signature or {}
        self.resumed = 0  # batches read back from resume_dir

    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("evaluation needs gradients: build the Trainer with "
                               "inference_mode=False (conf/trainer/default.yaml sets it)")
        self.evaluator.reset()

    on_validation_start = on_test_start

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 0:  # kept for the honesty checks' model probes, no second data pass
            self.probe = (x.detach(), y.detach())
        path = None if self.resume_dir is None else \
            self.resume_dir / f"rank{self.global_rank}-batch{batch_idx:06d}.pt"
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("signature") == self.signature and torch.equal(saved["y"], y.cpu()):
                self.evaluator.record(EvalBatch.from_state(saved["batch"], y.device), y)
                self.resumed += 1
                return
        out = self.evaluator.attack_batch(self.net, to_memory_format(x, self.memory_format), y)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"signature": self.signature, "y": y.cpu(), "batch": out.state()}, tmp)
            tmp.replace(path)
        self.evaluator.record(out, y)

    validation_step = test_step

    def on_test_epoch_end(self) -> None:
        self.results = self.evaluator.compute(self.class_names)
        self.n_images = self.evaluator.count()
        self.cost = self.evaluator.cost()
        self.evaluator.reset()

    on_validation_epoch_end = on_test_epoch_end
