"""Metric sets per task, shared by the LightningModule and ``evaluate.py`` (torchmetrics).

Single-label (``multiclass``): accuracy, balanced accuracy (macro-averaged recall: HAM10000 is
67% one class, so plain accuracy alone misleads), macro F1 and macro one-vs-rest AUROC of the
softmax probabilities (for a binary task, the AUROC of the positive class). Multi-label: macro AUROC over
findings, macro accuracy and macro F1 at a 0.5 threshold. The ``score`` of a task is the metric
used to pick checkpoints: balanced accuracy (multiclass) or macro AUROC (multilabel).
With ``per_class=True`` (test and ``evaluate.py``) the set adds recall per class (multiclass)
or AUROC per finding (multilabel); :func:`scalar_metrics` names those ``recall/<class>`` and
``auroc/<finding>``.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

from lightning_modules.core.tasks import SCORE_METRIC, check_task

__all__ = ["build_metrics", "scalar_metrics", "SCORE_METRIC", "PER_CLASS_SUFFIX", "SoftmaxAUROC"]

PER_CLASS_SUFFIX = "_per_class"


class SoftmaxAUROC(MulticlassAUROC):
    """``MulticlassAUROC`` of ``softmax(logits)``. torchmetrics applies the softmax itself only
    when some value lies outside [0, 1], so logits that happen to lie inside would be ranked
    raw; this always ranks the probabilities."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.float().softmax(-1), target)


def build_metrics(task: str, num_classes: int, prefix: str = "", per_class: bool = False
                  ) -> MetricCollection:
    """A fresh ``MetricCollection`` for ``task``; keys are ``prefix + name``."""
    if check_task(task) == "multiclass":
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "bal_acc": MulticlassAccuracy(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "auroc": SoftmaxAUROC(num_classes, average="macro"),
        }
        if per_class:
            metrics["recall" + PER_CLASS_SUFFIX] = MulticlassRecall(num_classes, average=None)
    else:
        metrics = {
            "auroc": MultilabelAUROC(num_classes, average="macro"),
            "acc": MultilabelAccuracy(num_classes, average="macro"),
            "f1_macro": MultilabelF1Score(num_classes, average="macro"),
        }
        if per_class:
            metrics["auroc" + PER_CLASS_SUFFIX] = MultilabelAUROC(num_classes, average=None)
    return MetricCollection(metrics, prefix=prefix)


def scalar_metrics(values: dict, class_names: list[str] | None = None) -> dict[str, float]:
    """Computed metrics as plain floats; per-class vectors become ``<metric>/<class name>``."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.endswith(PER_CLASS_SUFFIX):
            base = key[: -len(PER_CLASS_SUFFIX)]
            vec = value.flatten().tolist()
            names = class_names if class_names and len(class_names) == len(vec) \
                else [str(i) for i in range(len(vec))]
            out.update({f"{base}/{n}": float(v) for n, v in zip(names, vec, strict=True)})
        else:
            out[key] = float(value)
    return out
