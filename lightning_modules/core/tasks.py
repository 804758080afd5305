"""The task of a classifier, in one place: its name, per-sample loss, "prediction wrong" and score.

- ``multiclass`` (single-label): targets are class indices ``(batch,)``; softmax cross-entropy.
- ``multilabel``: targets are multi-hot ``(batch, findings)``; a sigmoid BCE-with-logits per
  finding, summed over findings.

Per-sample losses map ``(logits, target)`` to ``(batch,)``. Attacks maximise their sum, so each
sample's input gradient does not depend on the batch size (a mean would shrink it by ``1/batch``
and, in float16, push it towards underflow). Losses are computed in float32 even when the
logits come from an autocast region.

Every module takes the task from a :class:`Task` (or its name); nothing infers it from the
shape of ``y``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "chance_level",
    "TASKS", "SCORE_METRIC", "LossFn", "Task", "as_task", "check_task",
    "cross_entropy_per_sample", "bce_per_sample",
]

TASKS = ("multiclass", "multilabel")

# The metric that ranks models of a task (checkpoint selection, summaries): balanced accuracy
# (HAM10000 is 67% one class, so plain accuracy misleads) or macro AUROC over findings.
SCORE_METRIC = {"multiclass": "bal_acc", "multilabel": "auroc"}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_task(task: str, key: str = "task") -> str:
    """``task`` if it is one of :data:`TASKS`, else a ``ValueError`` naming ``key``."""
    if task not in TASKS:
        raise ValueError(f"{key}={task!r} must be one of {list(TASKS)}")
    return task


def cross_entropy_per_sample(logits: torch.Tensor, target: torch.Tensor,
                             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy per sample; ``target`` holds class indices ``(batch,)``. With
    ``weight`` (one per class) each sample's loss is multiplied by its class weight."""
    return F.cross_entropy(logits.float(), target.long(), weight=weight, reduction="none")


def bce_per_sample(logits: torch.Tensor, target: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid BCE-with-logits summed over findings; ``target`` is multi-hot ``(batch, K)``.
    ``weight`` is BCE's ``pos_weight`` (one per finding)."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), target.float(), pos_weight=weight, reduction="none"
    ).sum(dim=1)


_LOSSES = {"multiclass": cross_entropy_per_sample, "multilabel": bce_per_sample}


@dataclass(frozen=True, eq=False)
class Task:
    """A task and, optionally, its training-loss weights (on the logits' device).

    Args:
        name: ``multiclass`` or ``multilabel``.
        weight: per-class cross-entropy ``weight`` or per-finding BCE ``pos_weight``;
            ``None`` = unweighted.
    """

    name: str = "multiclass"
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_task(self.name)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's per-sample loss ``(batch,)`` (weighted when ``weight`` is set)."""
        return _LOSSES[self.name](logits, target, self.weight)

    __call__ = loss  # a Task is a LossFn

    def wrong(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Boolean ``(batch,)``: the sample is misclassified (multi-label: any finding wrong
        at probability 0.5)."""
        if self.name == "multiclass":
            return logits.argmax(dim=1) != target
        return ((logits > 0) != target.bool()).any(dim=1)

    @property
    def single_label(self) -> bool:
        return self.name == "multiclass"

    @property
    def score_metric(self) -> str:
        return SCORE_METRIC[self.name]


def as_task(task: Task | str) -> Task:
    """A :class:`Task` from a task or its name."""
    return task if isinstance(task, Task) else Task(str(task))


def chance_level(task: str, num_classes: int) -> float:
    """Score of a constant or random predictor: 1/K balanced accuracy, 0.5 macro AUROC."""
    return 1.0 / num_classes if check_task(task) == "multiclass" else 0.5
