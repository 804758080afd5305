"""Threat models: the epsilon ball an attack lives in, kept apart from the attack loop.

Images are in [0, 1] and epsilon is in those pixel units (``8/255`` is the usual L-inf budget
for natural images). Each threat model knows how to draw a random start inside its ball, take
one ascent step along a gradient, and project back onto the ball intersected with [0, 1]
(as in Madry et al., ICLR 2018, and the ``attack_steps`` of MadryLab/robustness).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

__all__ = ["parse_eps", "format_eps", "ThreatModel", "LinfBall", "L2Ball", "make_threat"]


def parse_eps(value: float | int | str, name: str = "eps") -> float:
    """Return ``value`` as a float; accepts numbers and fractions written as ``"8/255"``.

    Never calls ``eval``. Raises ``ValueError`` naming ``name`` for negative or malformed values.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a number")
    if isinstance(value, str):
        text = value.strip()
        try:
            out = float(Fraction(text))
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"{name}={value!r} is not a number or a fraction like '8/255'"
            ) from None
    else:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r} is not a number") from None
    if out != out or out < 0 or out == float("inf"):  # NaN, negative or infinite
        raise ValueError(f"{name}={value!r} must be a finite number >= 0 (pixel units in [0, 1])")
    return out


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    flat = t.flatten(1).norm(p=2, dim=1)
    return flat.view(-1, *([1] * (t.dim() - 1)))


class ThreatModel:
    """A norm ball of radius ``eps`` around the clean input, intersected with [0, 1]."""

    norm: str = ""

    def __init__(self, eps: float | str) -> None:
        self.eps = parse_eps(eps)

    def random_init(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample distance in this norm, ``(batch,)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def outside(self, x_adv: torch.Tensor, x: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        """Per sample: ``x_adv`` is farther than eps from ``x`` (relative tolerance ``rtol``,
        plus float32 rounding) or leaves [0, 1]: an attack that broke its threat model."""
        d = self.distance(x_adv.float(), x.float())
        far = d > self.eps * (1 + rtol) + 1e-6
        flat = x_adv.flatten(1)
        return far | (flat.amin(1) < -1e-6) | (flat.amax(1) > 1 + 1e-6) | \
            ~torch.isfinite(flat).all(1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.6g})"


class LinfBall(ThreatModel):
    """L-inf ball: ``||x_adv - x||_inf <= eps``; steps follow the gradient's sign."""

    norm = "linf"

    def __init__(self, eps: float | str) -> None:
        super().__init__(eps)
        if self.eps > 1:  # pixels live in [0, 1]: eps=8 is a typo for 8/255
            raise ValueError(f"eps={eps!r} is above 1: L-inf eps is in [0, 1] pixel units "
                             "(write 8/255, not 8)")

    def random_init(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.empty_like(x).uniform_(-self.eps, self.eps)
        return (x + noise).clamp_(0.0, 1.0)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        return x_adv + step_size * grad.sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = (x_adv - x).clamp_(-self.eps, self.eps)
        return (x + delta).clamp_(0.0, 1.0)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_adv - x).flatten(1).abs().amax(1)


class L2Ball(ThreatModel):
    """L2 ball: ``||x_adv - x||_2 <= eps`` per sample; steps follow the normalised gradient."""

    norm = "l2"

    def random_init(self, x: torch.Tensor) -> torch.Tensor:
        direction = torch.randn_like(x)
        direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        return self.project(x + direction * radius * self.eps, x)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        return x_adv + step_size * grad / _per_sample_norm(grad).clamp_min(1e-12)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        scale = (self.eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta * scale).clamp_(0.0, 1.0)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_adv - x).flatten(1).norm(dim=1)


_THREATS = {"linf": LinfBall, "l2": L2Ball}


def make_threat(norm: str, eps: float | str) -> ThreatModel:
    """Build the threat model for ``norm`` ('linf' or 'l2') with radius ``eps``."""
    key = str(norm).lower().replace("-", "").replace("_", "")
    if key in ("inf", "linfinity"):
        key = "linf"
    if key not in _THREATS:
        raise ValueError(f"norm={norm!r} is not supported; choose one of {sorted(_THREATS)}")
    return _THREATS[key](eps)


def format_eps(eps: float) -> str:
    """``8/255`` for multiples of 1/255, else the number (``0.5``)."""
    if eps == 0:
        return "0"
    if float(eps).is_integer():
        return str(int(eps))  # an L2 radius of 1, not "255/255"
    k = eps * 255.0
    if math.isclose(k, round(k), abs_tol=1e-6):
        return f"{round(k)}/255"
    return f"{eps:.4g}"
