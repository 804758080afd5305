"""The LightningModule behind ``evaluate.py``: a trained network attacked over an eps grid.

It orchestrates; the work is done by :class:`~lightning_modules.evaluation.engine.RobustEvaluator`,
the engine the training module validates and tests with. Running it through a Lightning
``Trainer`` (built from the same ``trainer`` config group as training) gives device choice,
mixed precision, DDP with metrics reduced across ranks, limits and a progress bar. It needs
``Trainer(inference_mode=False)``: attacks need gradients.

The grid is a set of typed :class:`~lightning_modules.evaluation.schema.Cell` (attack, norm,
eps, worst-case group), keyed ``<attack>@<eps>`` (eps written as ``8/255``); with two or more
attacks of one norm, each radius above 0 also gets the per-sample worst case over them (group
``worst``, or ``worst-<norm>`` when attacks of several norms are mounted). The report rows are
built from the cells (:meth:`EvaluationModule.rows`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.attacks import Attack
from lightning_modules.core.config import instantiate_node
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tensors import to_memory_format
from lightning_modules.evaluation.engine import EvalBatch, RobustEvaluator
from lightning_modules.evaluation.schema import WORST, Cell, ResultRow

__all__ = ["EvaluationModule", "build_attacks", "grid_cells", "resume_signature",
           "worst_case_groups"]

log = logging.getLogger(__name__)

def grid_cells(attacks: Mapping[str, Attack], eps_grid: Sequence[float]) -> dict[str, Cell]:
    """Every cell of the grid by key: each attack at each radius, and at each radius above 0
    with two or more attacks of one norm their per-sample worst case (group ``worst``, or
    ``worst-<norm>`` when attacks of several norms are mounted: a worst case is taken only
    over attacks of one threat model)."""
    if any(name.startswith(WORST) for name in attacks):
        raise ValueError(f"attack names starting with '{WORST}' are reserved for the worst case")
    norms = sorted({a.norm for a in attacks.values()})
    cells: dict[str, Cell] = {}
    for eps in eps_grid:
        for norm in norms:
            names = [n for n, a in attacks.items() if a.norm == norm]
            group = (WORST if len(norms) == 1 else f"{WORST}-{norm}") \
                if eps > 0 and len(names) > 1 else None
            for name in names:
                cell = Cell(name, norm, float(eps), group)
                cells[cell.key] = cell
            if group is not None:
                cell = Cell(group, norm, float(eps), group)
                cells[cell.key] = cell
    return cells


def worst_case_groups(cells: Mapping[str, Cell]) -> dict[str, list[str]]:
    """``{worst cell key: [keys of the attack cells it takes the worst case over]}``."""
    return {w.key: [c.key for c in cells.values() if not c.worst and c.group == w.group
                    and c.eps == w.eps] for w in cells.values() if w.worst}


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
        self.grid = grid_cells(attacks, eps_grid)
        self.cells = {key: attacks[c.attack].with_eps(c.eps) for key, c in self.grid.items()
                      if not c.worst}
        self.evaluator = RobustEvaluator(task, num_classes, self.cells,
                                         worst_case=worst_case_groups(self.grid),
                                         per_class=True, cascade=cascade)
        self.class_names = class_names
        self.results: dict[str, dict[str, float]] = {}
        self.n_images = 0
        self.cost: dict[str, dict[str, float]] = {}
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None  # first batch (checks)
        self.resume_dir = None if resume_dir is None else Path(resume_dir)
        self.signature = signature or {}
        self.resumed = 0  # batches read back from resume_dir

    def rows(self) -> list[ResultRow]:
        """The report rows in the engine's order: the attack cells, then the worst cases
        (after ``trainer.test``/``validate``)."""
        return [ResultRow.from_cell(self.grid[key], metrics, self.cost.get(key),
                                    None if self.grid[key].worst else self.cells[key].describe())
                for key, metrics in self.results.items() if key in self.grid]

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


def build_attacks(nodes: DictConfig, task: str) -> tuple[dict[str, Attack], dict[str, str]]:
    """The mounted attacks (``attacks.<name>`` nodes of ``conf/attack``) that can attack this
    task, and why the others were skipped (e.g. AutoAttack on a multi-label checkpoint)."""
    if not nodes:
        raise ConfigError("attacks is empty: mount at least one conf/attack node")
    attacks = {name: instantiate_node(nodes, name) for name in nodes}
    skipped = {name: f"{atk.name} attacks only {'/'.join(atk.tasks)} tasks, this one is {task}"
               for name, atk in attacks.items() if task not in atk.tasks}
    for name, why in skipped.items():
        log.warning("attack %s skipped: %s", name, why)
        del attacks[name]
    if not attacks:
        raise ConfigError(f"no mounted attack can attack a {task} task: {skipped}")
    return attacks, skipped


def resume_signature(ckpt_path: str, ckpt: dict, attacks: Mapping[str, Attack],
                     eps_grid: list[float], cascade: bool, split: str, subset: int | None,
                     n_split: int | None, seed: int | None, datamodule: Any, trainer: Any
                     ) -> dict[str, Any]:
    """What saved batches must match to be reused after a kill (plain values only)."""
    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    return json.loads(json.dumps({
        "checkpoint": str(Path(ckpt_path).resolve()), "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"), "split": split, "subset": subset,
        "n_split": n_split, "seed": seed, "eps_grid": eps_grid, "cascade": cascade,
        "attacks": {n: a.describe() for n, a in attacks.items()},
        "datamodule": plain(datamodule) if datamodule else None,
        "trainer": plain(trainer)}, default=str))
