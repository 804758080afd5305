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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.attacks import Attack
from lightning_modules.core.config import instantiate_node
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tensors import to_memory_format
from lightning_modules.core.threat import parse_eps
from lightning_modules.evaluation.certify import Certifier
from lightning_modules.evaluation.engine import EvalBatch, RobustEvaluator
from lightning_modules.evaluation.schema import WORST, Cell, ResultRow

__all__ = ["EvaluationModule", "attack_radii", "build_attacks", "grid_cells", "resume_signature",
           "worst_case_groups"]

log = logging.getLogger(__name__)

def grid_cells(attacks: Mapping[str, Attack], eps_grid: Sequence[float],
               radii: Mapping[str, Sequence[float]] | None = None) -> dict[str, Cell]:
    """Every cell of the grid by key: each attack at each radius (an attack named in ``radii``
    only at its radii there, e.g. the costly fast attack only at the threat radius), and at
    each radius above 0 with two or more attacks of one norm their per-sample worst case (group
    ``worst``, or ``worst-<norm>`` when attacks of several norms are mounted: a worst case is
    taken only over attacks of one threat model)."""
    if any(name.startswith(WORST) for name in attacks):
        raise ValueError(f"attack names starting with '{WORST}' are reserved for the worst case")
    radii = {k: [float(e) for e in v] for k, v in (radii or {}).items()}
    unknown = sorted(set(radii) - set(attacks))
    if unknown:
        raise ValueError(f"radii names attacks that are not mounted: {unknown}")
    norms = sorted({a.norm for a in attacks.values()})
    cells: dict[str, Cell] = {}
    for eps in eps_grid:
        for norm in norms:
            names = [n for n, a in attacks.items() if a.norm == norm and
                     (n not in radii or any(abs(eps - r) < 1e-9 for r in radii[n]))]
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


class CatRows(torchmetrics.Metric):
    """Per-image rows (certification) concatenated across batches and DDP ranks, and the
    seconds they took, summed."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("seconds", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, rows: torch.Tensor, seconds: float) -> None:
        self.rows.append(rows)
        self.seconds += seconds

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows
        if isinstance(rows, list):
            rows = torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)
        return rows, self.seconds


class EvaluationModule(L.LightningModule):
    """Args:
        net: the trained backbone (images in [0, 1] -> logits).
        task, num_classes: as in training.
        attacks: name -> attack; each is run at every radius of ``eps_grid``.
        eps_grid: radii in [0, 1] pixel units.
        radii: attack name -> the radii of the grid it runs at (the others: all).
        channels_last: run in channels-last memory format (as the training run did).
        cascade: at each radius, each attack runs only on the images every earlier attack
            failed on (rows become cumulative; see :class:`RobustEvaluator`).
        certifier: with ``evaluation=certify``, each image is also certified by randomized
            smoothing (:class:`~lightning_modules.evaluation.certify.Certifier`), its noise
            seeded by ``seed`` and the image's index in the split; :attr:`certified` holds
            every image's row (all ranks) and :attr:`certify_seconds` the time it took.
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
                 signature: dict | None = None, certifier: Certifier | None = None,
                 seed: int = 0, radii: Mapping[str, Sequence[float]] | None = None) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        self.grid = grid_cells(attacks, eps_grid, radii)
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
        self.certifier, self.seed, self.num_classes = certifier, int(seed), int(num_classes)
        self.certify_stats = CatRows()
        self.certified: torch.Tensor | None = None
        self.certify_seconds = 0.0
        self._seen = 0  # images of this rank's shard so far (their index in the split)

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
        self.certify_stats.reset()
        self._seen = 0

    on_validation_start = on_test_start

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 0:  # kept for the honesty checks' model probes, no second data pass
            self.probe = (x.detach(), y.detach())
        # ShardSampler: rank r reads images r, r + w, ... of the split
        world = self._trainer.world_size if self._trainer is not None else 1
        indices = [self.global_rank + (self._seen + j) * world
                   for j in range(x.shape[0])]
        self._seen += x.shape[0]
        path = None if self.resume_dir is None else \
            self.resume_dir / f"rank{self.global_rank}-batch{batch_idx:06d}.pt"
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("signature") == self.signature and torch.equal(saved["y"], y.cpu()):
                self.evaluator.record(EvalBatch.from_state(saved["batch"], y.device), y)
                if self.certifier is not None:
                    self.certify_stats.update(saved["certify"].to(y.device),
                                              float(saved["certify_seconds"]))
                self.resumed += 1
                return
        x = to_memory_format(x, self.memory_format)
        out = self.evaluator.attack_batch(self.net, x, y)
        rows, seconds = None, 0.0
        if self.certifier is not None:
            start = time.perf_counter()
            rows = self.certifier.run(self.net, x, y, indices, self.seed, self.num_classes)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            seconds = time.perf_counter() - start
            log.info("certified batch %d (%d images, %.2f s per image)", batch_idx,
                     x.shape[0], seconds / max(1, x.shape[0]))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            extra = {} if rows is None else {"certify": rows, "certify_seconds": seconds}
            torch.save({"signature": self.signature, "y": y.cpu(), "batch": out.state(),
                        **extra}, tmp)
            tmp.replace(path)
        self.evaluator.record(out, y)
        if rows is not None:
            self.certify_stats.update(rows.to(y.device), seconds)

    validation_step = test_step

    def on_test_epoch_end(self) -> None:
        self.results = self.evaluator.compute(self.class_names)
        self.n_images = self.evaluator.count()
        self.cost = self.evaluator.cost()
        self.evaluator.reset()
        if self.certifier is not None:
            self.certified, seconds = self.certify_stats.compute()
            self.certified, self.certify_seconds = self.certified.cpu(), float(seconds)
            self.certify_stats.reset()

    on_validation_epoch_end = on_test_epoch_end


def attack_radii(spec: Mapping[str, Any] | None, attacks: Mapping[str, Attack],
                 threat_eps: float, eps_grid: Sequence[float]) -> dict[str, list[float]]:
    """``evaluation.radii`` resolved: attack name -> its radii (``threat`` = ``threat.eps``,
    ``all`` = the whole grid, or a list); names of attacks not mounted (skipped for the task)
    are dropped."""
    out = {}
    for name, value in (spec or {}).items():
        if name not in attacks:
            continue
        if value == "all":
            continue
        if value == "threat":
            values = [threat_eps]
        elif isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            values = [parse_eps(v, f"evaluation.radii.{name}") for v in value]
        else:
            raise ConfigError(f"evaluation.radii.{name}={value!r} must be 'threat', 'all' or a "
                              "list of radii")
        missing = [v for v in values if not any(abs(v - e) < 1e-9 for e in eps_grid)]
        if missing:
            raise ConfigError(f"evaluation.radii.{name}: {missing} is not in eps_grid "
                              f"{list(eps_grid)}")
        out[name] = values
    return out


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
                     n_split: int | None, seed: int | None, datamodule: Any, trainer: Any,
                     certify: dict[str, Any] | None = None,
                     radii: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """What saved batches must match to be reused after a kill (plain values only)."""
    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    # what does not change a result: the run folder (a new time stamp per run), the display
    trainer = {k: v for k, v in (plain(trainer) or {}).items() if k not in (
        "default_root_dir", "enable_progress_bar", "log_every_n_steps", "enable_model_summary")}

    return json.loads(json.dumps({
        "checkpoint": str(Path(ckpt_path).resolve()), "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"), "split": split, "subset": subset,
        "n_split": n_split, "seed": seed, "eps_grid": eps_grid, "cascade": cascade,
        "attacks": {n: a.describe() for n, a in attacks.items()}, "certify": certify,
        "radii": dict(radii or {}),
        "datamodule": plain(datamodule) if datamodule else None,
        "trainer": trainer}, default=str))
