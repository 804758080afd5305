"""The fast default evaluation attack: AutoAttack's white-box half on a budget, and its black-box
half only where gradients say nothing.

AutoAttack standard (Croce & Hein, ICML 2020) spends most of its time where it rarely finds
anything on a model with honest gradients: FAB-T and Square's 5,000 queries (on a HAM10000 MART
checkpoint they took four fifths of the time and fooled no extra image). Following A3 (Liu et
al., "Practical Evaluation of Adversarial Robustness via Adaptive Auto Attack", CVPR 2022:
spend the budget where it can still break images, route each image to what works on it) and
the margin losses of MM (Gao et al., ICML 2022), :class:`FastAttack` runs, each stage only on
the images still classified right:

1. **routing**: the input gradient of the C&W margin ``max_{j != y} z_j - z_y`` at the clean
   image (one forward and backward pass). An image whose gradient is zero or not finite has
   masked gradients (a non-differentiable step, a saturated output); white-box steps cannot
   move it, so it goes straight to stage 4;
2. **APGD-CE** (the authors' ``pyautoattack`` code) with ``ce_iters`` iterations;
3. **APGD-T** on the targeted DLR loss, for the ``targets`` classes with the highest clean
   logits after the true one (AutoAttack's own ranking), ``targeted_iters`` iterations each.
   DLR needs 3 classes (targeted: 4): with 3 classes APGD on the untargeted DLR loss; with 2,
   where DLR is undefined and the C&W margin orders points as cross-entropy does, a second
   APGD-CE from another random start;
4. **Square** (black box, ``square_queries`` queries, AutoAttack's settings) on the images
   routed in stage 1 only.

Everything runs in float32 with autocast off (the third-party code has no loss scaling), and
the global random state is left as it was (``pyautoattack`` reseeds it). Single-label only.
Inputs in [0, 1], eps in the same pixel units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.attacks.base import Attack, input_grad
from lightning_modules.attacks.pgd import margin_loss
from lightning_modules.core.tasks import LossFn, Task

__all__ = ["FastAttack", "third_party_precision", "model_dtype"]

_NORMS = {"linf": "Linf", "l2": "L2"}


class third_party_precision:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Autocast off (float32) around a third-party attack, on the input's device type, and the
    global RNG (CPU and that CUDA device) restored afterwards."""

    def __init__(self, x: torch.Tensor) -> None:
        self._rng = torch.random.fork_rng(devices=[x.device] if x.is_cuda else [])
        self._cast = torch.autocast(device_type=x.device.type, enabled=False)

    def __enter__(self) -> None:
        self._rng.__enter__()
        self._cast.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._cast.__exit__(*exc)
        self._rng.__exit__(*exc)


def model_dtype(model: nn.Module) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


class FastAttack(Attack):
    """Args:
        eps: radius in [0, 1] pixel units (float or "8/255").
        norm: ``linf`` or ``l2``.
        ce_iters: APGD-CE iterations (AutoAttack: 100).
        targets: target classes of APGD-T, the highest clean logits after the true class
            (AutoAttack: 9); capped at ``num_classes - 1``.
        targeted_iters: APGD-T iterations per target (AutoAttack: 100).
        square_queries: Square queries for images with masked gradients (AutoAttack: 5,000).
        seed: the seed of every stage (deterministic for a seed).
        model_mode: ``eval`` (BatchNorm running statistics), as every evaluation attack.

    Example:
        >>> x_adv = FastAttack(eps="8/255", norm="linf", ce_iters=25, targets=3,
        ...                    targeted_iters=25, square_queries=5000, seed=0,
        ...                    model_mode="eval")(model, images, labels)
    """

    name = "fast"
    tasks = ("multiclass",)

    def __init__(self, eps: float | str, norm: str, ce_iters: int, targets: int,
                 targeted_iters: int, square_queries: int, seed: int, model_mode: str) -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        for key, val in (("ce_iters", ce_iters), ("targets", targets),
                         ("targeted_iters", targeted_iters), ("square_queries", square_queries)):
            if isinstance(val, bool) or int(val) != val or val < 0:
                raise ValueError(f"fast attack {key}={val!r} must be an integer >= 0")
        self.ce_iters, self.targets = int(ce_iters), int(targets)
        self.targeted_iters, self.square_queries = int(targeted_iters), int(square_queries)
        self.seed = int(seed)

    def _kwargs(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "ce_iters": self.ce_iters,
                "targets": self.targets, "targeted_iters": self.targeted_iters,
                "square_queries": self.square_queries, "seed": self.seed,
                "model_mode": self.model_mode}

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps,
                "ce_iters": self.ce_iters, "targets": self.targets,
                "targeted_iters": self.targeted_iters, "square_queries": self.square_queries,
                "seed": self.seed}

    def stages(self, num_classes: int) -> list[str]:
        """The white-box stages that run against a ``num_classes``-way model (Square runs on
        masked images only)."""
        second = "apgd-t" if num_classes >= 4 else "apgd-dlr" if num_classes == 3 else \
            "apgd-ce-restart"
        return [s for s, n in (("apgd-ce", self.ce_iters), (second, self.targeted_iters))
                if n > 0 and (s != "apgd-t" or self.targets > 0)]

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn) -> torch.Tensor:
        if task.name != "multiclass":
            raise ValueError("the fast attack is for single-label (multiclass) tasks; use PGD "
                             "for multi-label ones")
        with third_party_precision(x):
            dtype = model_dtype(model)
            xf, y = x.to(dtype).contiguous(), y.long()
            adv = xf.clone()
            with torch.no_grad():
                logits = model(xf)
            num_classes = int(logits.shape[1])
            robust = logits.argmax(1) == y
            masked = torch.zeros_like(robust)
            idx = robust.nonzero().squeeze(1)
            if idx.numel():
                grad = input_grad(model, xf[idx], y[idx], margin_loss).flatten(1)
                masked[idx] = ~torch.isfinite(grad).all(1) | (grad.abs().amax(1) == 0)
            for stage in self.stages(num_classes):
                todo = (robust & ~masked).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                runner = self._white_box(model, stage, num_classes)
                self._run(model, runner, xf, y, todo, adv, robust)
            todo = (robust & masked).nonzero().squeeze(1)
            if todo.numel() and self.square_queries > 0:
                from pyautoattack.square import SquareAttack

                runner = SquareAttack(model, p_init=0.8, n_queries=self.square_queries,
                                      eps=self.eps, norm=_NORMS[self.norm], n_restarts=1,
                                      seed=self.seed, verbose=False, resc_schedule=False,
                                      device=x.device)
                self._run(model, runner, xf, y, todo, adv, robust)
        return adv.to(x.dtype)

    def _white_box(self, model: nn.Module, stage: str, num_classes: int):
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        common = {"norm": _NORMS[self.norm], "eps": self.eps, "n_restarts": 1, "eot_iter": 1,
                  "rho": 0.75, "verbose": False}
        if stage == "apgd-t":
            return APGDAttack_targeted(model, n_iter=self.targeted_iters, seed=self.seed,
                                       n_target_classes=min(self.targets, num_classes - 1),
                                       **common)
        if stage == "apgd-ce":
            return APGDAttack(model, n_iter=self.ce_iters, seed=self.seed, loss="ce", **common)
        loss = "dlr" if stage == "apgd-dlr" else "ce"  # apgd-ce-restart: another start
        return APGDAttack(model, n_iter=self.targeted_iters, seed=self.seed + 1, loss=loss,
                          **common)

    @staticmethod
    def _run(model: nn.Module, runner, x: torch.Tensor, y: torch.Tensor, todo: torch.Tensor,
             adv: torch.Tensor, robust: torch.Tensor) -> None:
        """Attack the images ``todo``; those it fools get their adversarial example in ``adv``
        and leave ``robust``."""
        cand = runner.perturb(x[todo], y[todo]).detach().to(x.dtype)
        with torch.no_grad():
            fooled = model(cand).argmax(1) != y[todo]
        adv[todo[fooled]] = cand[fooled]
        robust[todo[fooled]] = False
