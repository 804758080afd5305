"""The defense interface: ``defense(model, x, y, loss_fn) -> DefenseOutput``.

A defense is a training strategy: given the current model and a clean batch (images in [0, 1])
it crafts whatever adversarial examples it needs and returns the scalar loss to minimise, plus
the logits it computed on the way so the caller can log clean and adversarial accuracy without
extra forward passes. ``loss_fn`` is per sample (cross-entropy or BCE-with-logits, see
``lightning_modules.attacks.losses``); defenses average it over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.losses import LossFn

__all__ = ["Defense", "DefenseOutput", "NoDefense", "weighted_loss"]


@dataclass
class DefenseOutput:
    """What a defense hands back for one batch."""

    loss: torch.Tensor
    logits_clean: torch.Tensor | None = None
    logits_adv: torch.Tensor | None = None


class Defense:
    """Base class. Subclasses implement :meth:`__call__` and keep their attacks in
    ``self.attacks`` (name -> attack), so an epsilon warm-up reaches all of them."""

    name = "defense"
    attacks: dict = {}

    def set_eps_scale(self, scale: float) -> None:
        """Scale every attack's eps (and step) by ``scale`` in [0, 1]: epsilon warm-up."""
        for atk in self.attacks.values():
            atk.set_eps_scale(scale)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> DefenseOutput:
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> dict:
        return {"defense": self.name}


class NoDefense(Defense):
    """Standard (empirical risk minimisation) training on clean images: no attack at all."""

    def __init__(self, name: str = "none") -> None:
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> DefenseOutput:
        logits = model(x)
        return DefenseOutput(loss=loss_fn(logits, y).mean(), logits_clean=logits)


def weighted_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
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
        loss = loss + clean_weight * loss_fn(logits_clean, y).mean()
    logits_adv = None
    for x_adv, weight in adversarial:
        logits_adv = model(x_adv)
        loss = loss + weight * loss_fn(logits_adv, y).mean()
    return DefenseOutput(loss=loss, logits_clean=logits_clean, logits_adv=logits_adv)
