"""What every attack shares: the call contract, the input gradient, immutability.

Contract: images ``x`` are in [0, 1] (normalisation lives inside the model), ``eps`` and step
sizes are in the same pixel units, and the returned ``x_adv`` is detached, inside the epsilon
ball and inside [0, 1]. The task (:class:`~lightning_modules.core.tasks.Task`) supplies the
per-sample loss to maximise (cross-entropy or BCE; ``loss_fn`` replaces it, e.g. TRADES' KL) and
what counts as a misclassified sample. Gradients come from ``torch.autograd.grad`` with respect
to the input only; the model is wrapped in :func:`.mode.attack_mode`, so parameter ``.grad``,
train/eval modes and BatchNorm statistics are exactly as before the call. Under float16
autocast the loss is scaled before the backward pass so the input gradient does not underflow
(sign and L2-normalised steps are scale-free).

An attack is immutable once built: a different radius is a new attack (:meth:`Attack.with_eps`,
:meth:`Attack.replace`), and an epsilon warm-up is a value passed to the call (``eps_scale``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lightning_modules.attacks.mode import MODES, attack_mode
from lightning_modules.core.tasks import LossFn, Task, as_task
from lightning_modules.core.threat import ThreatModel, make_threat

__all__ = ["Attack", "input_grad"]

_FP16_LOSS_SCALE = 1024.0


def _fp16_autocast_active(device_type: str) -> bool:
    if not torch.is_autocast_enabled(device_type):
        return False
    return torch.get_autocast_dtype(device_type) == torch.float16


def input_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
               loss_fn: LossFn, return_logits: bool = False):
    """Gradient of the summed per-sample loss with respect to the input only (no parameter
    gradients); under float16 autocast the loss is scaled first so it does not underflow.
    With ``return_logits`` also the (detached) logits of that forward pass."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = loss_fn(logits, y).sum()
    if _fp16_autocast_active(x_adv.device.type):
        loss = loss * _FP16_LOSS_SCALE
    (grad,) = torch.autograd.grad(loss, x_adv)
    return (grad, logits.detach()) if return_logits else grad


class Attack:
    """Base class: the threat model and the model mode used while attacking.

    Subclasses implement :meth:`_perturb` and :meth:`_kwargs` (their constructor arguments, so
    :meth:`replace` can build a modified copy).
    """

    name = "attack"
    tasks: tuple[str, ...] = ("multiclass", "multilabel")  # the tasks it can attack

    def __init__(self, eps: float | str, norm: str, model_mode: str) -> None:
        if model_mode not in MODES:
            raise ValueError(f"model_mode={model_mode!r} must be one of {MODES}")
        self.threat: ThreatModel = make_threat(norm, eps)
        self.model_mode = model_mode

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Freeze instances at the end of the most derived ``__init__``."""
        super().__init_subclass__(**kwargs)
        init = cls.__init__  # its own, or the (wrapped) inherited one

        @functools.wraps(init)
        def frozen_init(self, *args, **kw):
            init(self, *args, **kw)
            if type(self) is cls:
                object.__setattr__(self, "_frozen", True)

        cls.__init__ = frozen_init

    def __setattr__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"{type(self).__name__} is immutable: use with_eps() or "
                                 f"replace({key}=...) for a modified copy")
        object.__setattr__(self, key, value)

    @property
    def eps(self) -> float:
        """Radius of the threat model, [0, 1] pixel units."""
        return self.threat.eps

    @property
    def norm(self) -> str:
        return self.threat.norm

    def _kwargs(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "model_mode": self.model_mode}

    def replace(self, **changes: Any) -> Attack:
        """A new attack of the same kind with some constructor arguments changed."""
        return type(self)(**{**self._kwargs(), **changes})

    def with_eps(self, eps: float | str) -> Attack:
        """A copy at another radius (a step size given in pixels scales with it)."""
        return self.replace(eps=eps)

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 task: Task | str = "multiclass", loss_fn: LossFn | None = None,
                 eps_scale: float = 1.0) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: detached, same shape and dtype as ``x``; the
        identity at eps = 0.

        Args:
            task: the task (or its name): the loss to maximise and what counts as wrong.
            loss_fn: per-sample objective replacing the task's loss (e.g. a KL to the clean
                prediction); ``None`` = ``task.loss``.
            eps_scale: factor in [0, 1] on the radius (and step) for this call only: an
                epsilon warm-up, computed by the caller.
        """
        if not 0.0 <= eps_scale <= 1.0:
            raise ValueError(f"eps_scale={eps_scale} must be in [0, 1]")
        attack = self if eps_scale == 1.0 else self.with_eps(self.eps * eps_scale)
        if attack.eps == 0:
            return x.detach().clone()
        task = as_task(task)
        with attack_mode(model, attack.model_mode), torch.enable_grad():
            return attack._perturb(model, x.detach(), y, task, loss_fn or task.loss)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.describe().items() if k != "attack")
        return f"{type(self).__name__}({args})"
