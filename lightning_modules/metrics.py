"""Metric sets per task, shared by the LightningModule and ``evaluate.py`` (torchmetrics).

Single-label (``multiclass``): accuracy, balanced accuracy (macro-averaged recall: HAM10000 is
67% one class, so plain accuracy alone misleads) and macro F1. Multi-label: macro AUROC over
findings, macro accuracy and macro F1 at a 0.5 threshold. The ``score`` of a task is the metric
used to pick checkpoints: balanced accuracy (multiclass) or macro AUROC (multilabel).
"""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

__all__ = ["build_metrics", "SCORE_METRIC"]

SCORE_METRIC = {"multiclass": "bal_acc", "multilabel": "auroc"}


def build_metrics(task: str, num_classes: int, prefix: str = "") -> MetricCollection:
    """A fresh ``MetricCollection`` for ``task``; keys are ``prefix + name``."""
    if task == "multiclass":
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "bal_acc": MulticlassAccuracy(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        }
    elif task == "multilabel":
        metrics = {
            "auroc": MultilabelAUROC(num_classes, average="macro"),
            "acc": MultilabelAccuracy(num_classes, average="macro"),
            "f1_macro": MultilabelF1Score(num_classes, average="macro"),
        }
    else:
        raise ValueError(f"task={task!r} must be 'multiclass' or 'multilabel'")
    return MetricCollection(metrics, prefix=prefix)
