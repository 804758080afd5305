"""Metric sets per task, shared by the LightningModule and ``evaluate.py`` (torchmetrics).

Single-label (``multiclass``): accuracy, balanced accuracy (the mean recall over the classes
present among the evaluated images, as scikit-learn's ``balanced_accuracy_score``: HAM10000 is
67% one class, so plain accuracy alone misleads; a class with no image is left out, not counted
as recall 0), macro F1 and macro one-vs-rest AUROC of the
softmax probabilities (for a binary task, the AUROC of the positive class). Multi-label: macro AUROC over
findings, macro accuracy and macro F1 at a 0.5 threshold. The ``score`` of a task is the metric
used to pick checkpoints: balanced accuracy (multiclass) or macro AUROC (multilabel).
With ``per_class=True`` (test and ``evaluate.py``) the set adds recall per class (multiclass)
or AUROC per finding (multilabel); :func:`scalar_metrics` names those ``recall/<class>`` and
``auroc/<finding>``, with ``None`` for a class absent from the evaluated images (see
:func:`absent_classes`).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

from lightning_modules.core.tasks import SCORE_METRIC, check_task

__all__ = ["build_metrics", "scalar_metrics", "absent_classes", "SCORE_METRIC",
           "PER_CLASS_SUFFIX", "SoftmaxAUROC", "PresentClassRecall"]

PER_CLASS_SUFFIX = "_per_class"


class SoftmaxAUROC(MulticlassAUROC):
    """``MulticlassAUROC`` of ``softmax(logits)``. torchmetrics applies the softmax itself only
    when some value lies outside [0, 1], so logits that happen to lie inside would be ranked
    raw; this always ranks the probabilities."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.float().softmax(-1), target)


class PresentClassRecall(Metric):
    """Recall of each class over its images (argmax prediction), ``nan`` for a class with no
    image; ``average="macro"``: their mean over the classes present (balanced accuracy as
    scikit-learn's ``balanced_accuracy_score`` defines it). torchmetrics' macro
    ``MulticlassAccuracy`` counts an absent class as recall 0: on a sample without one of 7
    classes it reports 6/7 of the balanced accuracy. Counts are summed across DDP ranks."""

    full_state_update = False

    def __init__(self, num_classes: int, average: str | None) -> None:
        super().__init__()
        if average not in ("macro", None):
            raise ValueError(f"average={average!r} must be 'macro' or None")
        self.num_classes, self.average = int(num_classes), average
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("support", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        pred = preds.argmax(dim=1) if preds.dim() == 2 else preds.long()
        self.support += torch.bincount(target, minlength=self.num_classes)
        self.correct += torch.bincount(target[pred == target], minlength=self.num_classes)

    def compute(self) -> torch.Tensor:
        recall = self.correct.double() / self.support.double()  # nan where absent
        recall[self.support == 0] = float("nan")
        if self.average is None:
            return recall.float()
        present = recall[self.support > 0]
        return present.mean().float() if present.numel() else torch.tensor(float("nan"))


def absent_classes(values: dict[str, float | None]) -> list[str]:
    """The classes a :func:`scalar_metrics` dict shows as absent (``recall/<class>: None``)."""
    return [k.split("/", 1)[1] for k, v in values.items()
            if k.startswith("recall/") and v is None]


def build_metrics(task: str, num_classes: int, prefix: str = "", per_class: bool = False
                  ) -> MetricCollection:
    """A fresh ``MetricCollection`` for ``task``; keys are ``prefix + name``."""
    if check_task(task) == "multiclass":
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "bal_acc": PresentClassRecall(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "auroc": SoftmaxAUROC(num_classes, average="macro"),
        }
        if per_class:
            metrics["recall" + PER_CLASS_SUFFIX] = PresentClassRecall(num_classes, average=None)
    else:
        metrics = {
            "auroc": MultilabelAUROC(num_classes, average="macro"),
            "acc": MultilabelAccuracy(num_classes, average="macro"),
            "f1_macro": MultilabelF1Score(num_classes, average="macro"),
        }
        if per_class:
            metrics["auroc" + PER_CLASS_SUFFIX] = MultilabelAUROC(num_classes, average=None)
    return MetricCollection(metrics, prefix=prefix)


def scalar_metrics(values: dict, class_names: list[str] | None = None
                   ) -> dict[str, float | None]:
    """Computed metrics as plain floats; per-class vectors become ``<metric>/<class name>``,
    ``None`` for a class absent from the evaluated images (``nan``)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.endswith(PER_CLASS_SUFFIX):
            base = key[: -len(PER_CLASS_SUFFIX)]
            vec = value.flatten().tolist()
            names = class_names if class_names and len(class_names) == len(vec) \
                else [str(i) for i in range(len(vec))]
            out.update({f"{base}/{n}": None if v != v else float(v)
                        for n, v in zip(names, vec, strict=True)})
        else:
            out[key] = float(value)
    return out
