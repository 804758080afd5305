"""Weight averaging for adversarial training: an EMA (or SWA) of the weights is what validation,
model selection, the checkpoints, the test and ``evaluate.py`` see.

A thin subclass of Lightning's :class:`lightning.pytorch.callbacks.WeightAveraging` (torch's
``AveragedModel`` underneath), which swaps the averaged weights in for every validation epoch,
writes them as the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``, the
average's counter to ``averaging_state``) and copies them into the model when training ends.
What it adds:

- ``kind="ema"``: ``avg <- d * avg + (1 - d) * w`` after every optimizer step with the warm-up
  ``d = min(decay, (1 + n) / (10 + n))`` over ``n`` updates so far (the ``num_updates`` rule of
  TensorFlow's ExponentialMovingAverage), so short runs are not dominated by the initial
  weights; ``kind="swa"``: the equal average of the weights at the end of each epoch from
  ``swa_start_epoch`` on (Izmailov et al., UAI 2018). BatchNorm running statistics are averaged
  with the weights (``use_buffers``), integer buffers are copied.
- Nothing swapped in before the first update (SWA before ``swa_start_epoch``): validation and
  checkpoints see the raw weights until there is an average (Lightning's callback would show
  the initial weights it copied at setup).
- Restores that keep the averaged weights: Lightning's callback reloads ``current_model_state``
  (the raw weights) whenever a checkpoint is loaded while it holds an average, so
  ``trainer.test(ckpt_path=...)`` after ``fit`` would test the raw weights. Here the raw weights
  are restored only when fitting resumes; testing and validating a checkpoint use its averaged
  ``state_dict``.

Weight averaging is the other standard remedy for robust overfitting beside robust early stopping
(Rice et al., ICML 2020; Gowal et al. 2020 for EMA in adversarial training).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging as _LightningWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["KINDS", "WeightAveraging", "ema_decay"]

KINDS = ("ema", "swa")


def ema_decay(decay: float, num_updates: int) -> float:
    """The EMA decay after ``num_updates`` updates: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class WeightAveraging(_LightningWeightAveraging):
    """EMA (default) or SWA of the model's weights and buffers; see the module docstring.

    Args:
        kind: ``ema`` or ``swa``.
        decay: EMA decay in [0, 1) (its cap once warmed up).
        swa_start_epoch: SWA: the first epoch (0-based) whose end weights enter the average.
        device: where the averaged copy lives (``None``: the model's device).
    """

    def __init__(self, kind: str, decay: float, swa_start_epoch: int,
                 device: str | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"callbacks.weight_averaging.kind={kind!r} must be one of {KINDS}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"callbacks.weight_averaging.decay={decay} must be in [0, 1)")
        if int(swa_start_epoch) < 0:
            raise ValueError(f"callbacks.weight_averaging.swa_start_epoch={swa_start_epoch} "
                             "must be >= 0")
        self.kind, self.decay, self.swa_start_epoch = kind, float(decay), int(swa_start_epoch)
        self._swapped = False  # the model holds the average (during validation)
        super().__init__(device=device, use_buffers=True,
                         **({"avg_fn": self._ema} if kind == "ema" else {}))

    def _ema(self, averaged: torch.Tensor, current: torch.Tensor,
             num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # num_batches_tracked
            return current
        # num_averaged counts the updates before this one (the first update copied the weights)
        d = ema_decay(self.decay, int(num_averaged) - 1)
        return averaged * d + current * (1.0 - d)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if self.kind == "ema":
            return step_idx is not None
        return epoch_idx is not None and epoch_idx >= self.swa_start_epoch

    def _averaged(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def averaged_model(self) -> torch.nn.Module | None:
        """The ``AveragedModel`` (its ``module`` is the averaged LightningModule), or ``None``
        before the first update."""
        return self._average_model if self._averaged() else None

    def on_validation_epoch_start(self, trainer: pl.Trainer,
                                  pl_module: pl.LightningModule) -> None:
        if self._averaged():
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._averaged():
            self._copy_average_to_current(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not self._averaged():
            return
        if not self._swapped:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # saved mid-validation (a SIGTERM): the model holds the average now; swap back, take
        # copies (state dicts share storage with the weights the swap overwrites), swap again
        self._swap_models(pl_module)
        try:
            checkpoint["state_dict"] = pl_module.state_dict()
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            for key in ("state_dict", "current_model_state", "averaging_state"):
                checkpoint[key] = {k: v.clone() for k, v in checkpoint[key].items()}
        finally:
            self._swap_models(pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # test/validate a checkpoint: its state_dict (the average) stays loaded
        if "averaging_state" not in checkpoint:  # saved before the first update: nothing to load
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
