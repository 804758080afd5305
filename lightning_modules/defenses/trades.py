"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off
between Robustness and Accuracy", ICML 2019).

Minimises, per batch::

    L = mean_i [ l(f(x_i), y_i) + beta * KL( f(x_i) || f(x'_i) ) ]
    x'_i = argmax_{x' in B_eps(x_i)} KL( f(x_i) || f(x') )        (PGD, start x + 0.001 N(0,1))

``l`` is cross-entropy (single-label) or BCE summed over findings (multi-label); KL is between
softmax distributions, or the sum over findings of Bernoulli KLs (multi-label). The clean
prediction is a fixed target during the inner maximisation and carries gradient in the outer
loss, as in the reference code. ``beta = 0`` is clean training.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.attacks import Attack, attack_mode
from lightning_modules.core.tasks import Task, as_task
from lightning_modules.defenses.base import Defense, DefenseOutput
from lightning_modules.defenses.divergences import kl_per_sample

__all__ = ["TRADES"]


class TRADES(Defense):
    """Args: attack (its loss is replaced by the KL to the clean prediction), beta >= 0."""

    def __init__(self, attack: Attack, beta: float, name: str) -> None:
        if beta < 0:
            raise ValueError(f"defense.beta={beta} must be >= 0")
        self.attacks = {"kl": attack}
        self.beta = float(beta)
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        task = as_task(task)
        attack = self.attacks["kl"]
        with torch.no_grad(), attack_mode(model, attack.model_mode):
            target = model(x).detach()

        def kl_to_clean(logits_adv: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
            return kl_per_sample(target, logits_adv, task.name)

        x_adv = attack(model, x, y, task, loss_fn=kl_to_clean, eps_scale=eps_scale) \
            if self.beta > 0 else x
        logits_clean = model(x)
        loss = task.loss(logits_clean, y).mean()
        logits_adv = None
        if self.beta > 0:
            logits_adv = model(x_adv)
            loss = loss + self.beta * kl_per_sample(logits_clean, logits_adv, task.name).mean()
        return DefenseOutput(loss=loss, logits_clean=logits_clean, logits_adv=logits_adv)

    def describe(self) -> dict:
        return {"defense": self.name, "beta": self.beta,
                "attacks": {k: a.describe() for k, a in self.attacks.items()}}
