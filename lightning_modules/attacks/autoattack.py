"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020) through the authors' code as packaged on PyPI
(``pyautoattack``), behind this project's attack contract.

The standard suite is APGD-CE, APGD-T, FAB-T and Square, each run only on the samples still
robust. Its targeted parts need enough classes, so the components follow the number of classes
(read from the model's output), as :func:`components_for` states:

- 2 classes: APGD-CE and Square (the DLR losses need at least 3 classes);
- 3 classes: APGD-CE, APGD-DLR, FAB-T (2 targets) and Square (targeted DLR needs 4);
- 4 or more: APGD-CE, APGD-T and FAB-T (min(9, C - 1) targets each) and Square.

Single-label only, and for evaluation only: it maximises its own losses (``loss_fn`` is not
used) and is far too costly for training. It runs in float32 with autocast off (the authors'
code has no loss scaling for float16), and leaves the global random state as it was. Inputs in [0, 1], eps in the same pixel units.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lightning_modules.attacks.base import Attack
from lightning_modules.attacks.fast import model_dtype, third_party_precision
from lightning_modules.core.tasks import LossFn, Task

__all__ = ["AutoAttack", "components_for"]

log = logging.getLogger("medrobust.attacks")

_NORMS = {"linf": "Linf", "l2": "L2"}
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
KNOWN = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


def components_for(num_classes: int, max_targets: int = 9) -> tuple[list[str], int]:
    """The standard suite's components for ``num_classes`` classes and the number of target
    classes of its targeted parts (see the module docstring)."""
    if num_classes < 2:
        raise ValueError(f"AutoAttack needs at least 2 classes, the model has {num_classes}")
    targets = max(1, min(int(max_targets), num_classes - 1))
    if num_classes == 2:
        return ["apgd-ce", "square"], targets
    if num_classes == 3:
        return ["apgd-ce", "apgd-dlr", "fab-t", "square"], targets
    return list(STANDARD), targets


class AutoAttack(Attack):
    """Args:
        eps: radius in [0, 1] pixel units (float or "8/255").
        norm: ``linf`` or ``l2``.
        components: ``null`` = the standard suite chosen from the number of classes
            (:func:`components_for`), or a list of ``apgd-ce``, ``apgd-dlr``, ``apgd-t``,
            ``fab``, ``fab-t``, ``square``.
        max_targets: cap on the target classes of APGD-T and FAB-T (9 in the standard suite;
            never more than ``num_classes - 1``).
        square_queries: queries of the Square attack (5000 in the standard suite).
        seed: the attacks' seed (AutoAttack is deterministic for a seed).
        model_mode: ``eval`` (BatchNorm running statistics), as every evaluation attack.

    Example:
        >>> x_adv = AutoAttack(eps="8/255")(model, images, labels)
    """

    name = "autoattack"
    tasks = ("multiclass",)

    def __init__(self, eps: float | str, norm: str, components: list[str] | None,
                 max_targets: int, square_queries: int, seed: int, model_mode: str) -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        if components is not None:
            unknown = sorted(set(components) - set(KNOWN))
            if unknown or not components:
                raise ValueError(f"AutoAttack components {list(components)} must be a non-empty "
                                 f"list of {list(KNOWN)}")
            components = list(components)
        for key, val in (("max_targets", max_targets), ("square_queries", square_queries)):
            if int(val) != val or val < 1:
                raise ValueError(f"AutoAttack {key}={val!r} must be an integer >= 1")
        self.components = components
        self.max_targets = int(max_targets)
        self.square_queries = int(square_queries)
        self.seed = int(seed)

    def _kwargs(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "components": self.components,
                "max_targets": self.max_targets, "square_queries": self.square_queries,
                "seed": self.seed, "model_mode": self.model_mode}

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps,
                "components": self.components or "standard, by number of classes",
                "max_targets": self.max_targets, "square_queries": self.square_queries,
                "seed": self.seed}

    def suite(self, num_classes: int) -> tuple[list[str], int]:
        """The components that run against a ``num_classes``-way model and their targets."""
        components, targets = components_for(num_classes, self.max_targets)
        return (list(self.components) if self.components else components), targets

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn) -> torch.Tensor:
        if task.name != "multiclass":
            raise ValueError("AutoAttack is for single-label (multiclass) tasks; use PGD for "
                             "multi-label ones")
        with third_party_precision(x):  # float32, autocast off; the global RNG kept
            return self._run(model, x, y)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack as _AutoAttack

        xf = x.to(model_dtype(model))
        with torch.no_grad():
            num_classes = int(model(xf[:1]).shape[1])
        components, targets = self.suite(num_classes)
        runner = _AutoAttack(model, attacks=components, version="custom", eps=self.eps,
                             norm=_NORMS[self.norm], seed=self.seed, device=x.device)
        # its progress goes to the "auto-attack" logger at DEBUG level (which component fooled
        # how many images); the results do not depend on it
        runner.verbose = True
        # the standard suite's settings (version="custom" keeps the classes' defaults otherwise)
        runner.apgd.n_restarts = 1
        runner.apgd_targeted.n_restarts = 1
        runner.apgd_targeted.n_target_classes = targets
        runner.fab.n_restarts = 1
        runner.fab.n_target_classes = targets
        runner.square.n_queries = self.square_queries
        # the authors' code views gradients flat: give it contiguous (not channels-last) images
        x_adv, _ = runner.run_standard_evaluation(xf.contiguous(), y.long(),
                                                  batch_size=x.shape[0])
        return x_adv.detach().to(x.dtype).contiguous(memory_format=_memory_format(x))
