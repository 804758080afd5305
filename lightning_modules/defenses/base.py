"""The defense interface: ``defense(model, x, y, task, eps_scale=1.0) -> DefenseOutput``.

A defense is a training strategy: given the current model and a clean batch (images in [0, 1])
it crafts whatever adversarial examples it needs and returns the scalar loss to minimise, plus
the logits it computed on the way so the caller can log clean and adversarial accuracy without
extra forward passes. ``task`` (:class:`~lightning_modules.core.tasks.Task`) gives the per-sample
training loss (cross-entropy or BCE-with-logits, class-weighted or not); defenses average it
over the batch. ``eps_scale`` in [0, 1] is the epsilon warm-up factor of this batch, computed
by the caller and passed on to every attack call (attacks are immutable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.core.tasks import Task, as_task

__all__ = ["Defense", "DefenseOutput", "NoDefense", "weighted_loss"]


@dataclass
class DefenseOutput:
    """What a defense hands back for one batch."""

    loss: torch.Tensor
    logits_clean: torch.Tensor | None = None
    logits_adv: torch.Tensor | None = None


class Defense:
    """Base class. Subclasses implement :meth:`__call__` and keep their attacks in
    ``self.attacks`` (name -> attack; empty for standard training)."""

    name = "defense"
    attacks: dict = {}
    tasks: tuple[str, ...] = ("multiclass", "multilabel")  # the tasks it can train
    # True: __call__ also takes ``index``, the training-set indices of the batch's images (the
    # datamodule then yields them), for defenses with per-image state (FGSM-PGI's priors)
    needs_index = False
    # False: no adversarial examples in training (the collapse monitor then stays silent)
    adversarial = True

    def on_train_epoch_start(self, epoch: int, num_samples: int = 0) -> None:
        """Called by the LightningModule before every training epoch."""

    def on_train_epoch_end(self) -> None:
        """Called by the LightningModule after every training epoch (on every DDP rank)."""

    def state_dict(self) -> dict:
        """State to keep in checkpoints (beyond the model's weights) for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> dict:
        return {"defense": self.name}


class NoDefense(Defense):
    """Standard (empirical risk minimisation) training on clean images: no attack at all."""

    adversarial = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        logits = model(x)
        return DefenseOutput(loss=as_task(task).loss(logits, y).mean(), logits_clean=logits)


def weighted_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    clean_weight: float,
    adversarial: list[tuple[torch.Tensor, float]],
) -> DefenseOutput:
    """``clean_weight * mean l(f(x), y) + sum_a w_a * mean l(f(x_a), y)`` over the
    ``(x_a, w_a)`` pairs; the clean forward pass is skipped when ``clean_weight == 0``.
    ``logits_adv`` are those of the last adversarial batch."""
    loss = x.new_zeros(())
    logits_clean = None
    if clean_weight > 0:
        logits_clean = model(x)
        loss = loss + clean_weight * task.loss(logits_clean, y).mean()
    logits_adv = None
    for x_adv, weight in adversarial:
        logits_adv = model(x_adv)
        loss = loss + weight * task.loss(logits_adv, y).mean()
    return DefenseOutput(loss=loss, logits_clean=logits_clean, logits_adv=logits_adv)
