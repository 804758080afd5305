"""The LightningModule: adversarial training and adversarial validation of one classifier.

It orchestrates; the pieces are plain PyTorch: ``net`` (a backbone taking images in [0, 1]),
``defense`` (returns the training loss for a batch, crafting adversarial examples from the
current weights), ``val_attack`` (crafts adversarial examples for validation and test) and the
evaluation engine (:class:`~lightning_modules.evaluation.engine.RobustEvaluator`), which turns clean
and adversarial predictions into metrics; ``evaluate.py`` uses the same engine.
One class serves single-label (``multiclass``, softmax cross-entropy) and multi-label
(``multilabel``, per-finding sigmoid BCE) tasks.

Logged keys: ``train/loss``, ``train/{acc,...}`` (clean) and ``train/adv_{acc,...}``;
``val/...`` and ``val/adv_...`` likewise, plus ``val/adv_score`` (balanced accuracy or macro
AUROC under ``val_attack``), ``val/adv_score_best``, and the selection scores ``val/sel_clean``
and ``val/sel_robust`` that the checkpoint callbacks monitor (see ``selection.py``).
Validation and test need ``Trainer(inference_mode=False)``: attacks need gradients.

DDP: every epoch-level value is a torchmetrics state reduced in this module's epoch-end hooks,
which run on every rank in the same order; nothing is logged with ``sync_dist``. A value
logged with ``sync_dist=True`` is reduced lazily when first read, and Lightning's progress bar
reads it on rank 0 alone at the end of the epoch: rank 0 then waits in an all-reduce while the
other ranks wait in the next collective, and the run hangs for good.

DDP padding: Lightning shards validation and test with a ``DistributedSampler``, which pads
the last shard with duplicates so that every rank runs as many batches (it must: validation
during fitting runs through the DDP wrapper, and uneven batch counts would hang it). Each
batch's duplicates are found from the sampler (:func:`padding_mask`) and left out of every
metric, so the values logged equal those of one process over the same data.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import MaxMetric, MeanMetric

from lightning_modules.attacks import Attack, attack_mode
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tasks import Task, check_task
from lightning_modules.core.tensors import to_memory_format
from lightning_modules.defenses import Defense
from lightning_modules.evaluation.engine import RobustEvaluator
from lightning_modules.evaluation.metrics import build_metrics, scalar_metrics
from lightning_modules.training.selection import INELIGIBLE, eligibility

__all__ = ["RobustClassifier", "padding_mask"]

# Epoch-level values logged here are already reduced across ranks (see the module docstring).
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")


def padding_mask(loader: Any, batch_idx: int, batch_size: int) -> torch.Tensor | None:
    """Which samples of batch ``batch_idx`` (of ``batch_size`` samples) of ``loader`` are real
    rather than ``DistributedSampler`` padding; ``None`` when all are real or the loader is not
    sharded by a ``DistributedSampler``.

    The sampler lists the ``len(sampler.dataset)`` indices (shuffled or not), appends copies of
    the first ones up to ``total_size`` (a multiple of the world size), and gives rank ``r``
    positions ``r, r + world, r + 2 world, ...``: its ``j``-th sample sits at position
    ``j * world + r``, a duplicate when that is ``>= len(sampler.dataset)``. Batches are
    consecutive runs of the rank's samples, so the ``i``-th batch starts at ``j = i * B`` (``B``
    the loader's batch size; the last batch may be shorter). ``limit_*_batches`` and
    ``fast_dev_run`` only stop early, so ``batch_idx`` still counts from the first batch.
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return None
    full = loader.batch_size if isinstance(loader, DataLoader) else None
    if full is None:
        full = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if full is None:
        raise RuntimeError("cannot tell DistributedSampler padding from real samples: the "
                           "evaluation DataLoader has no batch_size (a custom batch_sampler)")
    first = batch_idx * int(full)
    position = (first + torch.arange(batch_size)) * sampler.num_replicas + sampler.rank
    keep = position < len(sampler.dataset)
    return None if bool(keep.all()) else keep


class RobustClassifier(L.LightningModule):
    """Adversarially trained classifier; see the module docstring.

    Args:
        net: backbone mapping ``(B, C, H, W)`` images in [0, 1] to logits ``(B, num_classes)``.
        defense: training strategy (``lightning_modules.defenses``).
        val_attack: attack used in validation and test (``lightning_modules.attacks``).
        task: ``"multiclass"`` or ``"multilabel"``.
        num_classes: number of classes (multiclass) or findings (multilabel).
        optimizer: ``functools.partial`` of an optimizer taking ``params``.
        scheduler: optional ``functools.partial`` of a scheduler taking ``optimizer``.
        train_clean_metrics: when the defense has no clean forward pass, spend one extra
            no-grad forward per batch to log clean training metrics.
        eps_warmup_epochs: ramp every training attack's eps (and step) linearly from 0 to its
            configured value over this many epochs, updated every batch (0 = off).
        channels_last: keep the backbone and the images in channels-last memory format
            (faster convolutions on most CPUs and on GPUs with tensor cores).
        compile: wrap the backbone in ``torch.compile`` for fitting (first steps are slow; each
            train/eval and frozen/unfrozen combination of the attack compiles once).
        class_names: optional names, stored in checkpoints for reports (per-class metrics).
        class_weights: training-loss weights: one per class (cross-entropy ``weight``: each
            sample's loss is multiplied by the weight of its class) or one per finding
            (multi-label BCE ``pos_weight``); ``None`` = unweighted. ``train.py`` turns
            ``module.class_weights=balanced`` into counts-based weights. The attacks maximise the
            same weighted loss; MART/MAAdvT use their own boosted loss and ignore the weights.
            Validation and test losses are unweighted.
        eligibility: ``{max_class_share, min_above_chance}`` of
            :func:`~lightning_modules.training.selection.eligibility`: an epoch with degenerate clean
            validation predictions gets selection scores ``-1`` and is never the best.

    Selection scores, logged every validation epoch for the checkpoint callbacks:
    ``val/sel_clean`` (clean score) and ``val/sel_robust`` (score under the validation attack;
    ``val/sel_robust_best``: its best so far, what a hyperparameter search should maximise),
    both ``-1`` when the epoch is not eligible (``val/eligible`` = 0).
    """

    def __init__(
        self,
        net: nn.Module,
        defense: Defense,
        val_attack: Attack,
        task: str,
        num_classes: int,
        optimizer: Any,
        scheduler: Any,
        train_clean_metrics: bool,
        class_names: list[str] | None,
        eps_warmup_epochs: float,
        channels_last: bool,
        compile: bool,
        class_weights: list[float] | None,
        eligibility: dict,
    ) -> None:
        super().__init__()
        # Only plain values go into checkpoints (they load with torch.load(weights_only=True)).
        self.save_hyperparameters(
            ignore=["net", "defense", "val_attack", "optimizer", "scheduler"], logger=False
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = net
        self.defense = defense
        self.val_attack = val_attack
        self.task_name = check_task(task, "module.task")
        weights = None
        if class_weights is not None:
            if isinstance(class_weights, str) or len(class_weights) != num_classes:
                raise ValueError(f"module.class_weights={class_weights!r} must be null, "
                                 f"'balanced' (resolved by train.py) or {num_classes} numbers")
            if any(float(w) < 0 for w in class_weights):
                raise ValueError(f"module.class_weights={list(class_weights)} must be >= 0")
            weights = torch.tensor([float(w) for w in class_weights])
        self.register_buffer("class_weights", weights, persistent=False)  # None = unweighted
        self.score_key = Task(task).score_metric
        self.train_metrics = nn.ModuleDict({
            kind: build_metrics(task, num_classes) for kind in ("clean", "adv")})
        self.train_loss = MeanMetric()
        self.evaluators = nn.ModuleDict({
            stage: RobustEvaluator(task, num_classes, {"adv": val_attack},
                                   per_class=stage == "test")
            for stage in ("val", "test")})
        self.val_score_best = MaxMetric()
        self.sel_robust_best = MaxMetric()  # the best robust score of an eligible epoch
        self.eligibility_rule = dict(eligibility)
        self.ineligible_epochs: dict[int, str] = {}  # epoch -> why it cannot be selected
        if eps_warmup_epochs < 0:
            raise ValueError(f"module.eps_warmup_epochs={eps_warmup_epochs} must be >= 0")
        self.run_config: dict | None = None  # resolved Hydra config, stored in checkpoints
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._compiled = False

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit" and not self._compiled:
            self.net.compile()  # in place: state_dict keys (and checkpoints) stay the same
            self._compiled = True

    @property
    def task(self) -> Task:
        """The unweighted task (validation, test, monitors)."""
        return Task(self.task_name)

    @property
    def train_task(self) -> Task:
        """The task with the training-loss class weights (on the module's device)."""
        return Task(self.task_name, self.class_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ----------------------------------------------------------------------------- training
    def eps_scale(self, batch_idx: int) -> float:
        """Warm-up factor in [0, 1] for the current training batch."""
        warmup = self.hparams.eps_warmup_epochs
        if warmup <= 0:
            return 1.0
        n_batches = max(1, int(self.trainer.num_training_batches or 1))
        progress = self.current_epoch + (batch_idx + 1) / n_batches
        return min(1.0, progress / warmup)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, *index = batch  # (x, y, indices) when the defense needs_index
        x = to_memory_format(x, self.memory_format)
        scale = self.eps_scale(batch_idx)
        if self.hparams.eps_warmup_epochs > 0:
            self.log("train/eps_scale", scale, on_step=False, on_epoch=True)
        extra = {"index": index[0]} if self.defense.needs_index else {}
        out = self.defense(self.net, x, y, self.train_task, eps_scale=scale, **extra)
        logits_clean = out.logits_clean
        if logits_clean is None and self.hparams.train_clean_metrics:
            with torch.no_grad(), attack_mode(self.net, "eval"):
                logits_clean = self.net(x)
        target = y.long()
        if logits_clean is not None:
            self.train_metrics["clean"].update(logits_clean.detach().float(), target)
        if out.logits_adv is not None:
            self.train_metrics["adv"].update(out.logits_adv.detach().float(), target)
        loss = out.loss.detach()
        self._stop_if_not_finite(loss)
        self.train_loss.update(loss, weight=x.shape[0])
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return out.loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Stop at the first non-finite training loss, before its backward pass and optimizer
        step (so the weights and the checkpoints written so far stay good), with one line
        naming the step, epoch and defense. All DDP ranks take the same decision (one small
        all-reduce), so none is left waiting. Costs one device sync per step."""
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise ConfigError(
                f"training diverged: the training loss is {float(loss)} at step "
                f"{self.global_step} (epoch {self.current_epoch}, defense "
                f"{getattr(self.defense, 'name', type(self.defense).__name__)}); lower "
                "module.optimizer.lr (checkpoints written so far are kept)")

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        size = len(loader.dataset) if isinstance(loader, DataLoader) else 0
        self.defense.on_train_epoch_start(self.current_epoch, size)

    def on_train_epoch_end(self) -> None:
        self.defense.on_train_epoch_end()
        values = {}
        for kind, coll in self.train_metrics.items():
            if any(m.update_count > 0 for m in coll.values()):
                values[kind] = scalar_metrics(coll.compute())
            coll.reset()
        if self.train_loss.update_count:
            loss = self.train_loss.compute()  # the same value on every rank
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged: train/loss is {float(loss)} in epoch "
                    f"{self.current_epoch}; lower module.optimizer.lr (checkpoints written "
                    "so far are kept)")
            self.log("train/loss_epoch", loss)
        self.train_loss.reset()
        self._log_values("train", values, prog_bar=False)

    # --------------------------------------------------------------------------- evaluation
    def _check_grad_possible(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "adversarial validation/test needs gradients, but the Trainer runs them under "
                "inference_mode: build the Trainer with inference_mode=False "
                "(conf/trainer/default.yaml sets it)"
            )

    def on_validation_start(self) -> None:
        self._check_grad_possible()

    def on_test_start(self) -> None:
        self._check_grad_possible()

    def _eval_step(self, stage: str, batch, batch_idx: int, dataloader_idx: int) -> None:
        x, y = batch
        loaders = self.trainer.val_dataloaders if stage == "val" else \
            self.trainer.test_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[dataloader_idx]
        elif isinstance(loaders, dict):
            loaders = list(loaders.values())[dataloader_idx]
        keep = padding_mask(loaders, batch_idx, x.shape[0])
        self.evaluators[stage].update(self.net, to_memory_format(x, self.memory_format), y,
                                      keep=keep)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        counts = self.evaluators["val"].predicted_counts()
        values = self._log_eval_epoch("val", prog_bar=True)
        if values and not self.trainer.sanity_checking:
            score = values[f"val/adv_{self.score_key}"]
            self.val_score_best.update(score)
            self.log("val/adv_score_best", self.val_score_best.compute())
            self._log_selection(values, counts)
        elif self.trainer.sanity_checking:
            self.val_score_best.reset()
            self.sel_robust_best.reset()

    def _log_selection(self, values: dict[str, torch.Tensor], counts: torch.Tensor | None
                       ) -> None:
        """``val/eligible``, ``val/sel_clean`` and ``val/sel_robust`` for this epoch."""
        clean = float(values[f"val/{self.score_key}"])
        ok, why = eligibility(self.task_name, self.hparams.num_classes, clean, counts,
                              **self.eligibility_rule)
        if not ok:
            self.ineligible_epochs[self.current_epoch] = why
        sel = {"val/eligible": float(ok),
               "val/sel_clean": clean if ok else INELIGIBLE,
               "val/sel_robust": float(values["val/adv_score"]) if ok else INELIGIBLE}
        self.sel_robust_best.update(sel["val/sel_robust"])
        sel["val/sel_robust_best"] = float(self.sel_robust_best.compute())
        self.log_dict({k: torch.tensor(v, device=self.device) for k, v in sel.items()})

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test", prog_bar=False)

    def _log_eval_epoch(self, stage: str, prog_bar: bool) -> dict[str, torch.Tensor]:
        evaluator = self.evaluators[stage]
        values = evaluator.compute(self.hparams.class_names)
        evaluator.reset()
        return self._log_values(stage, values, prog_bar)

    def _log_values(self, stage: str, by_kind: dict[str, dict[str, float]], prog_bar: bool
                    ) -> dict[str, torch.Tensor]:
        """Log ``{clean|adv: {metric: value}}`` as ``<stage>/<metric>`` and
        ``<stage>/adv_<metric>`` (plus ``<stage>/adv_score`` outside training)."""
        values = {f"{stage}/{'adv_' if kind == 'adv' else ''}{k}":
                  torch.tensor(v, device=self.device)
                  for kind, computed in by_kind.items() for k, v in computed.items()
                  if v is not None}  # a class absent from the images has no recall
        if stage != "train" and f"{stage}/adv_{self.score_key}" in values:
            values[f"{stage}/adv_score"] = values[f"{stage}/adv_{self.score_key}"]
        if values:
            shown = {f"{stage}/acc", f"{stage}/adv_acc", f"{stage}/adv_score"}
            self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=prog_bar)
            self.log_dict({k: v for k, v in values.items() if k not in shown})
        return values

    # ---------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.defense.load_state_dict(checkpoint.get("defense_state") or {})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self.defense.state_dict()
        if state:
            checkpoint["defense_state"] = state
        if self.run_config is not None:
            checkpoint["medrobust_config"] = self.run_config
