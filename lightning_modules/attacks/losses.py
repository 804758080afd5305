"""Per-sample attack losses: cross-entropy (single-label) and BCE-with-logits (multi-label).

Each loss maps ``(logits, target)`` to a tensor of shape ``(batch,)``. Attacks maximise the sum
over the batch, so each sample's input gradient does not depend on the batch size (a mean would
shrink it by ``1/batch`` and, in float16, push it towards underflow). Losses are computed in
float32 even when the logits come from an autocast region.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "LossFn", "cross_entropy_per_sample", "bce_per_sample", "loss_for_task", "TASKS",
    "task_of", "predictions_wrong",
]

TASKS = ("multiclass", "multilabel")


def cross_entropy_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per sample; ``target`` holds class indices, shape ``(batch,)``."""
    return F.cross_entropy(logits.float(), target.long(), reduction="none")


def bce_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE-with-logits summed over findings; ``target`` is multi-hot ``(batch, labels)``."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), target.float(), reduction="none"
    ).sum(dim=1)


def loss_for_task(task: str) -> LossFn:
    """The per-sample loss used for ``task`` ('multiclass' or 'multilabel')."""
    if task == "multiclass":
        return cross_entropy_per_sample
    if task == "multilabel":
        return bce_per_sample
    raise ValueError(f"task={task!r} is not supported; choose one of {list(TASKS)}")


def predictions_wrong(logits: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Boolean ``(batch,)``: the sample is misclassified (multi-label: any finding wrong at 0.5)."""
    if task == "multiclass":
        return logits.argmax(dim=1) != target
    return ((logits > 0) != target.bool()).any(dim=1)


def task_of(y: torch.Tensor) -> str:
    """``multiclass`` for class-index targets ``(batch,)``, ``multilabel`` for ``(batch, labels)``."""
    return "multiclass" if y.dim() == 1 else "multilabel"
