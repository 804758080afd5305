"""MPAdvT: Multi-Perturbations Adversarial Training (Xu et al., Medical Image Analysis 2021).

Training examples are attacked at several perturbation strengths, a list of levels
``(eps_l, steps_l)``: copies of one PGD attack (``attack``, e.g. ``conf/attack/pgd_train.yaml``)
at radius ``eps_l`` with ``steps_l`` steps (its step rule, start, norm and model mode kept).

- ``per_sample``: each example draws one level at random (probabilities ``probs``, uniform by
  default); costs about one attack per batch::

      L = w_c * mean_i l(f(x_i), y_i) + (1 - w_c) * mean_i l(f(PGD_{l_i}(x_i)), y_i),  l_i ~ probs

- ``all_levels``: every example is attacked at every level and the losses are averaged; costs
  one attack per level::

      L = w_c * mean_i l(f(x_i), y_i) + (1 - w_c) * mean_l mean_i l(f(PGD_l(x_i)), y_i)

- ``released``: as in the authors' released code, per batch: with probability ``p_adv`` the
  whole batch is replaced by PGD examples with a radius and a number of steps drawn afresh,
  otherwise the clean batch is used (``levels`` and ``clean_weight`` are not used)::

      L = mean_i l(f(x'_i), y_i),  x' = PGD_{eps, T}(x) with probability p_adv, else x' = x,
      eps ~ U[eps_min, eps_max],  T ~ U{1, ..., steps_max},  step size ``step_size`` (1/255)

``l`` is cross-entropy (single-label) or BCE summed over findings (multi-label); ``w_c`` is
``clean_weight`` in [0, 1]. Levels and draws come from the CPU generator (seeded by the run
seed), so drawing never syncs the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_modules.attacks import FGSM, PGD
from lightning_modules.core.tasks import Task, as_task
from lightning_modules.core.threat import parse_eps
from lightning_modules.defenses.base import Defense, DefenseOutput, weighted_loss

__all__ = ["MPAdvT"]

MODES = ("per_sample", "all_levels", "released")


class MPAdvT(Defense):
    """Args:
        attack: the PGD attack every level is a copy of (radius and steps replaced).
        levels: list of ``{eps, steps}`` (eps in [0, 1] pixel units, "2/255" allowed).
        mode: ``per_sample``, ``all_levels`` or ``released``.
        probs: per-level drawing probabilities for ``per_sample`` (uniform if ``None``).
        clean_weight: ``w_c`` in [0, 1].
        p_adv: ``released``: probability that a batch is adversarial.
        eps_min, eps_max: ``released``: range of the radius ([0, 1] pixel units).
        steps_max: ``released``: the number of PGD steps is drawn from 1..steps_max.
        step_size: ``released``: PGD step in pixel units (1/255 in the released code).
    """

    def __init__(
        self,
        attack: PGD,
        levels: Sequence[Mapping],
        mode: str,
        probs: Sequence[float] | None,
        clean_weight: float,
        p_adv: float,
        eps_min: float | str,
        eps_max: float | str | None,
        steps_max: int | None,
        step_size: float | str,
        name: str,
    ) -> None:
        if not isinstance(attack, PGD) or isinstance(attack, FGSM):
            raise TypeError(f"defense.attack is {type(attack).__name__}: MPAdvT levels are PGD "
                            "attacks (e.g. /attack@attack: pgd_train)")
        if mode not in MODES:
            raise ValueError(f"defense.mode={mode!r} must be one of {MODES}")
        self.mode = mode
        self.name = name
        if mode == "released":
            self._init_released(attack, p_adv, eps_min, eps_max, steps_max, step_size)
            return
        if not levels:
            raise ValueError("defense.levels is empty: give at least one {eps, steps}")
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"defense.clean_weight={clean_weight} must be in [0, 1]")
        self.attacks = {}
        for i, lvl in enumerate(levels):
            unknown = set(lvl) - {"eps", "steps"}
            if unknown or "eps" not in lvl or "steps" not in lvl:
                raise ValueError(f"defense.levels[{i}]={dict(lvl)} must have exactly eps and steps")
            self.attacks[f"level{i}"] = attack.replace(steps=lvl["steps"]).with_eps(lvl["eps"])
        n = len(self.attacks)
        probs = [1.0 / n] * n if probs is None else [float(p) for p in probs]
        if len(probs) != n or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(f"defense.probs={probs} must be {n} non-negative numbers")
        total = sum(probs)
        self.probs = torch.tensor([p / total for p in probs])
        self.clean_weight = float(clean_weight)

    def _init_released(self, attack: PGD, p_adv, eps_min, eps_max, steps_max, step_size) -> None:
        if not 0.0 <= float(p_adv) <= 1.0:
            raise ValueError(f"defense.p_adv={p_adv} must be in [0, 1]")
        eps_max = attack.eps if eps_max is None else parse_eps(eps_max, "defense.eps_max")
        eps_min = parse_eps(eps_min, "defense.eps_min")
        if eps_min > eps_max:
            raise ValueError(f"defense.eps_min={eps_min:.6g} > defense.eps_max={eps_max:.6g}")
        steps_max = attack.steps if steps_max is None else steps_max
        if int(steps_max) != steps_max or steps_max < 1:
            raise ValueError(f"defense.steps_max={steps_max!r} must be an integer >= 1")
        self.p_adv, self.eps_min, self.eps_max = float(p_adv), eps_min, eps_max
        self.steps_max = int(steps_max)
        self.attack = attack.replace(step_size=parse_eps(step_size, "defense.step_size"),
                                     step_size_rel=None)
        self.attacks = {"pgd": self.attack}
        self.clean_weight = 0.0

    def draw_batch(self, generator: torch.Generator | None = None
                   ) -> tuple[bool, float, int]:
        """``released`` mode: (adversarial?, eps, steps) for one batch, drawn on the CPU:
        adversarial with probability ``p_adv``, eps ~ U[eps_min, eps_max], steps ~ U{1..steps_max}."""
        u = torch.rand(2, generator=generator)
        steps = int(torch.randint(1, self.steps_max + 1, (1,), generator=generator))
        eps = self.eps_min + float(u[1]) * (self.eps_max - self.eps_min)
        return bool(u[0] < self.p_adv), eps, steps

    def draw_levels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Level index per example, drawn on the CPU from ``probs``: ``(n,)`` int64."""
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
        eps_scale: float = 1.0,
    ) -> DefenseOutput:
        task = as_task(task)
        if self.mode == "released":
            adversarial, eps, steps = self.draw_batch()
            if not adversarial:
                return weighted_loss(model, x, y, task, 1.0, [])
            atk = self.attack.replace(eps=eps, steps=steps)
            return weighted_loss(model, x, y, task, 0.0,
                                 [(atk(model, x, y, task, eps_scale=eps_scale), 1.0)])
        attacks = list(self.attacks.values())
        if self.mode == "per_sample":
            draw = self.draw_levels(x.shape[0])
            x_adv = torch.empty_like(x)
            for level, atk in enumerate(attacks):
                idx = (draw == level).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                idx = idx.to(x.device, non_blocking=True)
                x_adv[idx] = atk(model, x[idx], y[idx], task, eps_scale=eps_scale)
            adv_inputs = [x_adv]
        else:
            adv_inputs = [atk(model, x, y, task, eps_scale=eps_scale) for atk in attacks]
        w_adv = (1.0 - self.clean_weight) / len(adv_inputs)
        return weighted_loss(model, x, y, task, self.clean_weight,
                             [(xa, w_adv) for xa in adv_inputs])

    def describe(self) -> dict:
        if self.mode == "released":
            return {"defense": self.name, "mode": self.mode, "p_adv": self.p_adv,
                    "eps_min": self.eps_min, "eps_max": self.eps_max,
                    "steps_max": self.steps_max, "attack": self.attack.describe()}
        return {"defense": self.name, "mode": self.mode, "clean_weight": self.clean_weight,
                "probs": self.probs.tolist(),
                "levels": [a.describe() for a in self.attacks.values()]}
