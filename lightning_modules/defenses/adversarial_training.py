"""Adversarial training with one or several attacks mixed into one loss.

Minimises, per batch (Goodfellow et al., ICLR 2015; Madry et al., ICLR 2018)::

    L = w_clean * mean_i l(f(x_i), y_i) + sum_a w_a * mean_i l(f(A_a(f, x_i, y_i)), y_i)

where ``A_a`` are attacks crafted on the fly from the current weights (parameters frozen while
crafting, see ``attack_mode``), ``l`` is the per-sample loss (cross-entropy for single-label,
BCE-with-logits summed over findings for multi-label) and the weights need not sum to one.

Presets (``conf/defense``):
- ``fgsm_at``: FGSM with ``w_clean = 0.5`` (Goodfellow et al. 2015).
- ``pgd_at``: PGD only, ``w_clean = 0`` (Madry et al. 2018).
- ``fgsm_pgd_at``: FGSM and PGD examples of the same batch, 0.5 each: the combined adversarial
  training of the HAM10000 skin-cancer study.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_modules.attacks import Attack
from lightning_modules.core.tasks import Task, as_task
from lightning_modules.defenses.base import Defense, DefenseOutput, weighted_loss

__all__ = ["AdversarialTraining"]


class AdversarialTraining(Defense):
    """Train on adversarial examples from ``attacks`` (name -> attack), optionally plus clean.

    Args:
        attacks: mapping from a short name to an attack; crafted in order, every batch.
        weights: per-attack loss weight; default 1 / len(attacks) each.
        clean_weight: weight of the clean loss (0 disables the clean forward pass).
        name: label for logs and reports.
    """

    def __init__(
        self,
        attacks: Mapping[str, Attack],
        weights: Mapping[str, float] | None,
        clean_weight: float,
        name: str,
    ) -> None:
        if not attacks:
            raise ValueError("defense.attacks is empty: give at least one attack")
        self.attacks = dict(attacks)
        for key, atk in self.attacks.items():
            if not isinstance(atk, Attack):
                raise TypeError(f"defense.attacks.{key} is {type(atk).__name__}, not an Attack")
        if weights is None:
            weights = {k: 1.0 / len(self.attacks) for k in self.attacks}
        unknown = set(weights) - set(self.attacks)
        missing = set(self.attacks) - set(weights)
        if unknown or missing:
            raise ValueError(
                f"defense.weights keys {sorted(weights)} must match defense.attacks keys "
                f"{sorted(self.attacks)}"
            )
        self.weights = {k: float(v) for k, v in weights.items()}
        for key, w in self.weights.items():
            if w < 0:
                raise ValueError(f"defense.weights.{key}={w} must be >= 0")
        if clean_weight < 0:
            raise ValueError(f"defense.clean_weight={clean_weight} must be >= 0")
        self.clean_weight = float(clean_weight)
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        # Craft every adversarial batch first, from the same weights, then run the
        # training forward passes: the optimiser sees only these graphs.
        task = as_task(task)
        adversarial = [(atk(model, x, y, task, eps_scale=eps_scale), self.weights[k])
                       for k, atk in self.attacks.items()]
        return weighted_loss(model, x, y, task, self.clean_weight, adversarial)

    def describe(self) -> dict:
        return {
            "defense": self.name,
            "clean_weight": self.clean_weight,
            "attacks": {k: a.describe() for k, a in self.attacks.items()},
            "weights": self.weights,
        }
