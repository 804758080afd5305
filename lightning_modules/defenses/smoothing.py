"""Training for randomized smoothing: the base classifier ``f`` of a smoothed classifier
``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)`` (Cohen, Rosenfeld & Kolter,
ICML 2019), which ``evaluation=certify`` certifies in L2.

- :class:`GaussianAugmentation` (Cohen et al. 2019): ``L = mean_i CE(f(x_i + sigma eps_i), y_i)``,
  ``eps_i ~ N(0, I)``, one fresh draw per image and step, not clipped to [0, 1] (as in the
  paper; the smoothed classifier adds the same unclipped noise).
- :class:`SmoothAdv` (Salman et al., "Provably Robust Deep Learning via Adversarially Trained
  Smoothed Classifiers", NeurIPS 2019): ``m`` noise draws ``delta_j`` per image, fixed for the
  attack; PGD in the L2 ball of radius ``eps`` maximises the cross-entropy of the Monte-Carlo
  soft smoothed classifier ``G(x') = 1/m sum_j softmax(f(x' + delta_j))``; the base classifier
  is then trained on the noisy adversarial copies,
  ``L = mean_{i,j} CE(f(x'_i + delta_ij), y_i)`` (their released ``train_pgd.py``).

``sigma`` and the L2 radius are in [0, 1] pixel units, the norm over all pixels and channels.
``sigma`` is stored with the rest of the training config in the checkpoint
(``defense.sigma``), where ``evaluate.py evaluation=certify`` reads it. Single-label only: the
certificate is about the argmax class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_modules.attacks import Attack
from lightning_modules.core.tasks import Task, as_task
from lightning_modules.defenses.base import Defense, DefenseOutput

__all__ = ["GaussianAugmentation", "SmoothAdv", "SoftSmoothed", "check_sigma"]


def check_sigma(sigma: float, key: str = "defense.sigma") -> float:
    """``sigma`` as a float > 0, else a ``ValueError`` naming ``key``."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or \
            not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{key}={sigma!r} must be a number > 0 (noise std in [0, 1] pixel "
                         "units)")
    return float(sigma)


class SoftSmoothed(nn.Module):
    """The Monte-Carlo soft smoothed classifier of Salman et al. 2019 with fixed noise:
    ``log G(x) = log( 1/m sum_j softmax(f(x + noise_j)) )`` for ``noise`` of shape
    ``(m, *x.shape)``. Returns log-probabilities, so cross-entropy on them is
    ``-log G(x)_y``. Inputs must have the batch the noise was drawn for."""

    def __init__(self, net: nn.Module, noise: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.noise.shape[0]
        if self.noise.shape[1:] != x.shape:
            raise ValueError(f"SoftSmoothed: noise drawn for {tuple(self.noise.shape[1:])}, "
                             f"input is {tuple(x.shape)}")
        logits = self.net((x.unsqueeze(0) + self.noise).flatten(0, 1)).float()
        logp = logits.log_softmax(dim=-1).view(m, x.shape[0], -1)
        return torch.logsumexp(logp, dim=0) - math.log(m)


class GaussianAugmentation(Defense):
    """Gaussian noise augmentation (Cohen et al., ICML 2019): train on ``x + sigma * N(0, I)``.

    Args:
        sigma: noise standard deviation in [0, 1] pixel units (the smoothing sigma).
        name: label for logs and reports.
    """

    tasks = ("multiclass",)

    adversarial = False  # noise, not attacks

    def __init__(self, sigma: float, name: str) -> None:
        self.sigma = check_sigma(sigma)
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        task = as_task(task)
        logits = model(x + self.sigma * torch.randn_like(x))
        return DefenseOutput(loss=task.loss(logits, y).mean(), logits_adv=logits)

    def describe(self) -> dict:
        return {"defense": self.name, "sigma": self.sigma}


class SmoothAdv(Defense):
    """SmoothAdv-PGD (Salman et al., NeurIPS 2019); see the module docstring.

    Args:
        attack: the PGD whose loss is the soft smoothed classifier's cross-entropy; L2 only
            (its ``eps`` is the radius the smoothed classifier is trained against), without
            ``early_stop`` (the noise is drawn for the whole batch).
        sigma: noise standard deviation in [0, 1] pixel units.
        m: noise draws per image (for the attack and for the training loss).
        name: label for logs and reports.
    """

    tasks = ("multiclass",)

    def __init__(self, attack: Attack, sigma: float, m: int, name: str) -> None:
        if attack.norm != "l2":
            raise ValueError(f"smoothadv attacks the smoothed classifier in L2 (Salman et al. "
                             f"2019), got norm={attack.norm!r}: set threat=l2 (e.g. "
                             "threat.eps=0.5)")
        if getattr(attack, "early_stop", False):
            raise ValueError("defense.attack.early_stop must be false (the noise is drawn for "
                             "the whole batch)")
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise ValueError(f"defense.m={m!r} must be an integer >= 1")
        self.attacks = {"smooth_pgd": attack}
        self.sigma = check_sigma(sigma)
        self.m = int(m)
        self.name = name

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        task = as_task(task)
        noise = self.sigma * torch.randn((self.m, *x.shape), device=x.device, dtype=x.dtype)
        soft = SoftSmoothed(model, noise)
        x_adv = self.attacks["smooth_pgd"](soft, x, y, task, eps_scale=eps_scale)
        logits = model((x_adv.unsqueeze(0) + noise).flatten(0, 1))
        loss = task.loss(logits, y.repeat(self.m)).mean()
        with torch.no_grad():  # the soft smoothed prediction at x', for the training metrics
            logp = logits.detach().float().log_softmax(-1).view(self.m, x.shape[0], -1)
            soft_logits = torch.logsumexp(logp, dim=0) - math.log(self.m)
        return DefenseOutput(loss=loss, logits_adv=soft_logits)

    def describe(self) -> dict:
        return {"defense": self.name, "sigma": self.sigma, "m": self.m,
                "attacks": {k: a.describe() for k, a in self.attacks.items()}}
