"""Misclassification-aware adversarial training: MART (Wang, Zou, Yi, Bailey, Ma & Gu,
"Improving Adversarial Robustness Requires Revisiting Misclassified Examples", ICLR 2020) and
MAAdvT (Xu et al., Medical Image Analysis 2021, built on the same idea).

Single-label (softmax), per sample i with clean probabilities p, adversarial probabilities q::

    BCE_i = -log q_{y_i} - log(1.0001 - max_{k != y_i} q_k)              (boosted CE)
    L     = mean_i [ BCE_i + beta * KL(p_i || q_i) * (1.0000001 - p_{y_i}) ]

so examples the model currently gets wrong (small p_y) weigh more in the robustness term.
x' comes from the defense's attack (cross-entropy PGD). Gradients flow through p and q.

Multi-label (per-finding sigmoid), each finding j is a Bernoulli variable; the "most probable
wrong class" of a Bernoulli is the other outcome, so the boosted term becomes
``-log q_j(y_j) - log(1.0001 - (1 - q_j(y_j)))``, and the robustness term is the Bernoulli KL
weighted by that finding's own clean error ``1.0000001 - p_j(y_j)``; both are summed over
findings. For single-label outputs MAAdvT's objective, as specified for this project,
coincides with MART's; the presets differ in their attack (see ``conf/defense``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.attacks import Attack
from lightning_modules.core.tasks import Task, as_task
from lightning_modules.defenses.base import Defense, DefenseOutput
from lightning_modules.defenses.divergences import kl_per_sample, true_class_prob

__all__ = ["MisclassificationAwareAT", "boosted_ce", "misclassification_aware_loss"]


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """MART's boosted cross-entropy per sample (summed over findings for multi-label)."""
    z = logits_adv.float()
    if task == "multiclass":
        q = F.softmax(z, dim=1)
        others = q.scatter(1, y.long().view(-1, 1), -1.0)  # mask out the true class
        top_other = others.max(dim=1).values
        return F.cross_entropy(z, y.long(), reduction="none") - torch.log(1.0001 - top_other)
    q_true = true_class_prob(z, y, task)
    bce = F.binary_cross_entropy_with_logits(z, y.float(), reduction="none")
    return (bce - torch.log(1.0001 - (1.0 - q_true))).sum(dim=1)


def misclassification_aware_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor,
                                 y: torch.Tensor, beta: float, task: str) -> torch.Tensor:
    """The batch loss in the module docstring (a scalar); ``task`` is the task's name."""
    p_true = true_class_prob(logits_clean, y, task)
    if task == "multiclass":
        robust = kl_per_sample(logits_clean, logits_adv, task) * (1.0000001 - p_true)
    else:
        kl = kl_per_sample(logits_clean, logits_adv, task, reduce=False)
        robust = (kl * (1.0000001 - p_true)).sum(dim=1)
    return (boosted_ce(logits_adv, y, task) + beta * robust).mean()


class MisclassificationAwareAT(Defense):
    """Args: attack (crafts x' with the task loss), beta >= 0 (6 in MART), name."""

    def __init__(self, attack: Attack, beta: float, name: str) -> None:
        if beta < 0:
            raise ValueError(f"defense.beta={beta} must be >= 0")
        self.attacks = {"adv": attack}
        self.beta = float(beta)
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        task = as_task(task)
        x_adv = self.attacks["adv"](model, x, y, task, eps_scale=eps_scale)
        logits_clean = model(x)
        logits_adv = model(x_adv)
        loss = misclassification_aware_loss(logits_clean, logits_adv, y, self.beta, task.name)
        return DefenseOutput(loss=loss, logits_clean=logits_clean, logits_adv=logits_adv)

    def describe(self) -> dict:
        return {"defense": self.name, "beta": self.beta,
                "attacks": {k: a.describe() for k, a in self.attacks.items()}}
