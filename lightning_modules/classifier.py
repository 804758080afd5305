"""The LightningModule: adversarial training and adversarial validation of one classifier.

It orchestrates; the pieces are plain PyTorch: ``net`` (a backbone taking images in [0, 1]),
``defense`` (returns the training loss for a batch, crafting adversarial examples from the
current weights) and ``val_attack`` (crafts adversarial examples for validation and test).
One class serves single-label (``multiclass``, softmax cross-entropy) and multi-label
(``multilabel``, per-finding sigmoid BCE) tasks.

Logged keys: ``train/loss``, ``train/{acc,...}`` (clean) and ``train/adv_{acc,...}``;
``val/...`` and ``val/adv_...`` likewise, plus ``val/adv_score`` (balanced accuracy or macro
AUROC under ``val_attack``), on which the best checkpoint is chosen, and ``val/adv_score_best``.
Validation and test need ``Trainer(inference_mode=False)``: attacks need gradients.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric

from .attacks import Attack, attack_mode, loss_for_task
from .defenses import Defense
from .metrics import SCORE_METRIC, build_metrics, scalar_metrics

__all__ = ["RobustClassifier"]


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
    """

    def __init__(
        self,
        net: nn.Module,
        defense: Defense,
        val_attack: Attack,
        task: str,
        num_classes: int,
        optimizer: Any,
        scheduler: Any = None,
        train_clean_metrics: bool = True,
        class_names: list[str] | None = None,
        eps_warmup_epochs: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        class_weights: list[float] | None = None,
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
        self.task = task
        self.loss_fn = loss_for_task(task)
        self.train_loss_fn = self.loss_fn
        if class_weights is not None:
            if isinstance(class_weights, str) or len(class_weights) != num_classes:
                raise ValueError(f"module.class_weights={class_weights!r} must be null, "
                                 f"'balanced' (resolved by train.py) or {num_classes} numbers")
            if any(float(w) < 0 for w in class_weights):
                raise ValueError(f"module.class_weights={list(class_weights)} must be >= 0")
            self.register_buffer("class_weights",
                                 torch.tensor([float(w) for w in class_weights]), persistent=False)
            self.train_loss_fn = self._weighted_loss
        self.score_key = SCORE_METRIC[task]
        self.metrics = nn.ModuleDict({
            f"{stage}_{kind}": build_metrics(task, num_classes,
                                             prefix=f"{stage}/{'adv_' if kind == 'adv' else ''}",
                                             per_class=stage == "test")
            for stage in ("train", "val", "test") for kind in ("clean", "adv")
        })
        self.val_score_best = MaxMetric()
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

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.memory_format is torch.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _weighted_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample class-weighted cross-entropy, or BCE with ``pos_weight`` (multi-label)."""
        w = self.class_weights
        if self.task == "multiclass":
            return F.cross_entropy(logits.float(), y.long(), weight=w, reduction="none")
        return F.binary_cross_entropy_with_logits(logits.float(), y.float(), pos_weight=w,
                                                  reduction="none").sum(dim=1)

    @staticmethod
    def _target(y: torch.Tensor) -> torch.Tensor:
        return y.long()

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
        x, y = batch
        x = self._images(x)
        if self.hparams.eps_warmup_epochs > 0:
            scale = self.eps_scale(batch_idx)
            self.defense.set_eps_scale(scale)
            self.log("train/eps_scale", scale, on_step=False, on_epoch=True)
        out = self.defense(self.net, x, y, self.train_loss_fn)
        logits_clean = out.logits_clean
        if logits_clean is None and self.hparams.train_clean_metrics:
            with torch.no_grad(), attack_mode(self.net, "eval"):
                logits_clean = self.net(x)
        target = self._target(y)
        if logits_clean is not None:
            self.metrics["train_clean"].update(logits_clean.detach().float(), target)
        if out.logits_adv is not None:
            self.metrics["train_adv"].update(out.logits_adv.detach().float(), target)
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=x.shape[0], sync_dist=True)
        return out.loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", prog_bar=False)

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

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        x = self._images(x)
        logits = self.net(x)
        x_adv = self.val_attack(self.net, x, y, self.loss_fn)
        with torch.no_grad():
            logits_adv = self.net(x_adv)
        target = self._target(y)
        self.metrics[f"{stage}_clean"].update(logits.float(), target)
        self.metrics[f"{stage}_adv"].update(logits_adv.float(), target)
        self.log(f"{stage}/loss", self.loss_fn(logits, y).mean(), on_epoch=True,
                 batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/adv_loss", self.loss_fn(logits_adv, y).mean(), on_epoch=True,
                 batch_size=x.shape[0], sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val", prog_bar=True)
        if values and not self.trainer.sanity_checking:
            score = values[f"val/adv_{self.score_key}"]
            self.val_score_best.update(score)
            self.log("val/adv_score_best", self.val_score_best.compute(), sync_dist=True)
        elif self.trainer.sanity_checking:
            self.val_score_best.reset()

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", prog_bar=False)

    def _log_epoch(self, stage: str, prog_bar: bool) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for kind in ("clean", "adv"):
            coll = self.metrics[f"{stage}_{kind}"]
            if any(m.update_count > 0 for m in coll.values()):
                computed = scalar_metrics(coll.compute(), self.hparams.class_names)
                values.update({k: torch.tensor(v, device=self.device)
                               for k, v in computed.items()})
            coll.reset()
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["medrobust_config"] = self.run_config
