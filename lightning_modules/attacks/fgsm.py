"""Single-step attacks: FGSM (Goodfellow, Shlens & Szegedy, ICLR 2015) and N-FGSM (de Jorge et
al., "Make Some Noise", NeurIPS 2022). The call contract is in :mod:`.base`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.attacks.base import Attack, input_grad
from lightning_modules.attacks.pgd import PGD
from lightning_modules.core.tasks import LossFn, Task

__all__ = ["FGSM", "NFGSM"]


class FGSM(PGD):
    """Fast Gradient Sign Method: one step of size ``eps`` from the clean image.

    With ``norm="l2"`` this is the fast gradient method (one normalised step of length eps).
    ``random_start`` is off, as published; for FGSM with random start (Wong et al. 2020) use
    ``conf/attack/rs_fgsm.yaml`` (PGD with one step of 1.25 eps).
    """

    name = "fgsm"

    def __init__(self, eps: float | str, norm: str, model_mode: str) -> None:
        super().__init__(eps=eps, steps=1, step_size=None, norm=norm, random_start=False,
                         restarts=1, model_mode=model_mode, step_size_rel=1.0,
                         early_stop=False, loss="task", targeted=None, finding=None)

    _kwargs = Attack._kwargs  # FGSM takes only eps, norm and model_mode

    def with_eps(self, eps: float | str) -> FGSM:
        return self.replace(eps=eps)


class NFGSM(Attack):
    """N-FGSM: noise, then one FGSM step.

    ``x0 = x + U(-k*eps, k*eps)`` (``k = noise_mult``, 2 by default), then
    ``x_adv = clip_[0,1](x0 + alpha * sign(grad))`` with ``alpha = step_size_rel * eps``
    (1 by default). As published there is **no projection onto the eps ball**: the training
    perturbation may reach ``(k + 1) * eps``; only the pixel range is enforced. L-inf only.
    """

    name = "n_fgsm"

    def __init__(self, eps: float | str, noise_mult: float, step_size_rel: float, norm: str,
                 model_mode: str) -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        if self.norm != "linf":
            raise ValueError(f"n_fgsm supports norm='linf' only, got norm={norm!r}")
        if noise_mult < 0 or step_size_rel < 0:
            raise ValueError("noise_mult and step_size_rel must be >= 0")
        self.noise_mult = float(noise_mult)
        self.step_size_rel = float(step_size_rel)

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "noise_mult": self.noise_mult,
                "step_size_rel": self.step_size_rel}

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "steps": 1,
                "noise_mult": self.noise_mult, "step_size": self.step_size_rel * self.eps}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn) -> torch.Tensor:
        k_eps = self.noise_mult * self.eps
        x0 = (x + torch.empty_like(x).uniform_(-k_eps, k_eps)).clamp_(0.0, 1.0)
        grad = input_grad(model, x0, y, loss_fn)
        return (x0.detach() + self.step_size_rel * self.eps * grad.sign()).clamp_(0.0, 1.0)
