"""FGSM and PGD in plain PyTorch, for L-inf and L2 threat models.

- FGSM: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
- PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018.

Contract: images ``x`` are in [0, 1] (normalisation lives inside the model), ``eps`` and
``step_size`` are in the same pixel units, and the returned ``x_adv`` is detached, inside the
epsilon ball and inside [0, 1]. The loss is pluggable per sample (see :mod:`.losses`): pass
``loss_fn`` at call time, cross-entropy by default. Gradients come from
``torch.autograd.grad`` with respect to the input only; the model is wrapped in
:func:`.mode.attack_mode`, so parameter ``.grad``, train/eval modes and BatchNorm statistics are
exactly as before the call. Under float16 autocast the loss is scaled before the backward pass so
the input gradient does not underflow to zero (sign and L2-normalised steps are scale-free).
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import LossFn, cross_entropy_per_sample, predictions_wrong, task_of
from .mode import attack_mode
from .threat import make_threat, parse_eps

__all__ = ["PGD", "FGSM", "NFGSM", "Attack"]

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


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Attack:
    """Base class: holds the threat model and the model mode used while attacking.

    ``eps_scale`` (1 by default) multiplies the radius and the step size; defenses set it for
    an epsilon warm-up (see ``Defense.set_eps_scale``).
    """

    name = "attack"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        norm: str = "linf",
        model_mode: str = "eval",
    ) -> None:
        self._threat = make_threat(norm, eps)
        self.model_mode = model_mode
        self.eps_scale = 1.0

    @property
    def base_eps(self) -> float:
        return self._threat.eps

    @property
    def eps(self) -> float:
        return self._threat.eps * self.eps_scale

    @property
    def norm(self) -> str:
        return self._threat.norm

    @property
    def threat(self):
        """The threat model at the current (possibly warmed-up) radius."""
        if self.eps_scale == 1.0:
            return self._threat
        return make_threat(self.norm, self.eps)

    def set_eps_scale(self, scale: float) -> None:
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"eps_scale={scale} must be in [0, 1]")
        self.eps_scale = float(scale)

    def with_eps(self, eps: float | str) -> Attack:
        """A copy of this attack with another radius (step size scales with it)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps}

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None = None
    ) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: detached, same shape and dtype as ``x``; the
        identity at eps = 0. Subclasses implement :meth:`_perturb`, which runs inside
        :func:`attack_mode` with gradients enabled."""
        if self.eps == 0:
            return x.detach().clone()
        with attack_mode(model, self.model_mode), torch.enable_grad():
            return self._perturb(model, x.detach(), y, loss_fn or cross_entropy_per_sample)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: LossFn) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.describe().items() if k != "attack")
        return f"{type(self).__name__}({args})"


_STARTS = {True: "uniform", False: "none", "uniform": "uniform", "normal": "normal",
           "none": "none"}


class PGD(Attack):
    """Projected gradient ascent on a per-sample loss inside an L-inf or L2 ball.

    Args:
        eps: radius of the ball in [0, 1] pixel units (float or a fraction string, "8/255").
        steps: number of gradient steps (>= 1).
        step_size: ascent step in pixel units; ``None`` means ``2.5 * eps / steps`` (Madry et al.).
        step_size_rel: alternatively the step as a multiple of eps (e.g. 1.25 for the fast
            FGSM of Wong et al. 2020); exclusive with ``step_size``.
        norm: ``"linf"`` or ``"l2"``.
        random_start: ``True``/``"uniform"`` (uniform in the ball, Madry et al.), ``"normal"``
            (``x + 0.001 * N(0, 1)``, as in TRADES) or ``False``.
        restarts: independent random restarts; per sample the strongest result is kept
            (a misclassified example first, then the highest loss). Use > 1 for evaluation.
        model_mode: ``"eval"`` (BatchNorm running statistics) or ``"train"`` (batch statistics,
            running statistics untouched); see :func:`attack_mode`.
        early_stop: for evaluation: a sample whose current point is already misclassified
            (argmax) keeps that point and leaves the batch, so later steps cost less as the
            attack succeeds. Never weaker than plain PGD for accuracy-type metrics (a success
            is never undone by a later step). Single-label targets only (ignored for
            multi-label, whose AUROC depends on every logit); needs ``model_mode="eval"``
            (a shrinking batch would change BatchNorm batch statistics). Not for training.

    Example:
        >>> attack = PGD(eps="8/255", steps=10)
        >>> x_adv = attack(model, images, labels)           # images in [0, 1]
    """

    name = "pgd"

    def __init__(
        self,
        eps: float | str = 8 / 255,
        steps: int = 10,
        step_size: float | str | None = None,
        norm: str = "linf",
        random_start: bool | str = True,
        restarts: int = 1,
        model_mode: str = "eval",
        step_size_rel: float | None = None,
        early_stop: bool = False,
    ) -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        if early_stop and model_mode != "eval":
            raise ValueError("early_stop=true needs model_mode='eval' (a shrinking batch would "
                             "change BatchNorm batch statistics)")
        self.early_stop = bool(early_stop)
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts={restarts!r} must be an integer >= 1")
        if random_start not in _STARTS:
            raise ValueError(f"random_start={random_start!r} must be true, false, 'uniform' "
                             "or 'normal'")
        if step_size is not None and step_size_rel is not None:
            raise ValueError("give step_size or step_size_rel, not both")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.start = _STARTS[random_start]
        self._step_size = None if step_size is None else parse_eps(step_size, "step_size")
        self._step_rel = None if step_size_rel is None else parse_eps(step_size_rel,
                                                                      "step_size_rel")

    @property
    def random_start(self) -> bool:
        return self.start != "none"

    @property
    def step_size(self) -> float:
        if self._step_size is not None:
            return self._step_size * self.eps_scale
        if self._step_rel is not None:
            return self._step_rel * self.eps
        return 2.5 * self.eps / self.steps

    def with_eps(self, eps: float | str) -> PGD:
        new_eps = parse_eps(eps)
        rel = self._step_rel
        if self._step_size is not None:
            rel = self._step_size / self.base_eps if self.base_eps > 0 else None
        return PGD(eps=new_eps, steps=self.steps, norm=self.norm, random_start=self.start,
                   restarts=self.restarts, model_mode=self.model_mode, step_size_rel=rel,
                   early_stop=self.early_stop)

    def describe(self) -> dict:
        return {
            "attack": self.name,
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.start,
            "restarts": self.restarts,
            **({"early_stop": True} if self.early_stop else {}),
        }

    def _one_run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> torch.Tensor:
        threat = self.threat
        if self.start == "uniform":
            x_adv = threat.random_init(x)
        elif self.start == "normal":
            x_adv = threat.project(x + 0.001 * torch.randn_like(x), x)
        else:
            x_adv = x.clone()
        step_size = self.step_size
        if self.early_stop and y.dim() == 1:
            return self._early_stopping_run(model, x, y, loss_fn, x_adv)
        for _ in range(self.steps):
            grad = input_grad(model, x_adv, y, loss_fn)
            with torch.no_grad():
                x_adv = threat.project(threat.step(x_adv.detach(), grad, step_size), x)
        return x_adv.detach()

    def _early_stopping_run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            loss_fn: LossFn, x_adv: torch.Tensor) -> torch.Tensor:
        """PGD steps on the samples not yet misclassified only (see ``early_stop``)."""
        threat, step_size, fmt = self.threat, self.step_size, _memory_format(x)
        out = x_adv.detach().clone()
        active = torch.arange(x.shape[0], device=x.device)
        xa, xs, ys = out, x, y
        for _ in range(self.steps):
            grad, logits = input_grad(model, xa, ys, loss_fn, return_logits=True)
            with torch.no_grad():
                stepped = threat.project(threat.step(xa.detach(), grad, step_size), xs)
                going = logits.argmax(dim=1) == ys
                out[active] = torch.where(going.view(-1, *([1] * (x.dim() - 1))), stepped, xa)
                if bool(going.all()):  # one host sync per step: evaluation only
                    xa = stepped
                    continue
                active, xs, ys = active[going], xs[going], ys[going]
                if active.numel() == 0:
                    break
                xa = stepped[going].contiguous(memory_format=fmt)
                xs = xs.contiguous(memory_format=fmt)
        return out

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: LossFn) -> torch.Tensor:
        best = self._one_run(model, x, y, loss_fn)
        if self.restarts == 1:
            return best
        best_score = self._score(model, best, y, loss_fn)
        for _ in range(self.restarts - 1):
            cand = self._one_run(model, x, y, loss_fn)
            score = self._score(model, cand, y, loss_fn)
            better = score > best_score
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_score = torch.maximum(score, best_score)
        return best

    @staticmethod
    def _score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn):
        """Per-sample strength of an adversarial example: its loss, plus a large bonus when it
        is misclassified (single-label: argmax wrong; multi-label: any finding wrong at 0.5)."""
        with torch.no_grad():
            logits = model(x_adv)
            wrong = predictions_wrong(logits, y, task_of(y))
            return loss_fn(logits, y).float() + 1e6 * wrong.float()


class FGSM(PGD):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015): one step of size ``eps``.

    With ``norm="l2"`` this is the fast gradient method (one normalised step of length eps).
    ``random_start`` is off, as published; for FGSM with random start (Wong et al. 2020) use
    ``PGD(steps=1, step_size_rel=1.25)``.
    """

    name = "fgsm"

    def __init__(
        self, eps: float | str = 8 / 255, norm: str = "linf", model_mode: str = "eval"
    ) -> None:
        super().__init__(eps=eps, steps=1, norm=norm, random_start=False, restarts=1,
                         model_mode=model_mode, step_size_rel=1.0)

    def with_eps(self, eps: float | str) -> FGSM:
        return FGSM(eps=eps, norm=self.norm, model_mode=self.model_mode)


class NFGSM(Attack):
    """N-FGSM (de Jorge et al., "Make Some Noise", NeurIPS 2022): noise then one FGSM step.

    ``x0 = x + U(-k*eps, k*eps)`` (``k = noise_mult``, 2 by default), then
    ``x_adv = clip_[0,1](x0 + alpha * sign(grad))`` with ``alpha = step_size_rel * eps``
    (1 by default). As published there is **no projection onto the eps ball**: the training
    perturbation may reach ``(k + 1) * eps``; only the pixel range is enforced. L-inf only.
    """

    name = "n_fgsm"

    def __init__(self, eps: float | str = 8 / 255, noise_mult: float = 2.0,
                 step_size_rel: float = 1.0, norm: str = "linf",
                 model_mode: str = "eval") -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        if self.norm != "linf":
            raise ValueError(f"n_fgsm supports norm='linf' only, got {norm!r}")
        if noise_mult < 0 or step_size_rel < 0:
            raise ValueError("noise_mult and step_size_rel must be >= 0")
        self.noise_mult = float(noise_mult)
        self.step_size_rel = float(step_size_rel)

    def with_eps(self, eps: float | str) -> NFGSM:
        return NFGSM(eps, self.noise_mult, self.step_size_rel, self.norm, self.model_mode)

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "steps": 1,
                "noise_mult": self.noise_mult, "step_size": self.step_size_rel * self.eps}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: LossFn) -> torch.Tensor:
        k_eps = self.noise_mult * self.eps
        x0 = (x + torch.empty_like(x).uniform_(-k_eps, k_eps)).clamp_(0.0, 1.0)
        grad = input_grad(model, x0, y, loss_fn)
        return (x0.detach() + self.step_size_rel * self.eps * grad.sign()).clamp_(0.0, 1.0)
