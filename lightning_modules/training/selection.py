"""Which checkpoint a run tests: the criterion, chance levels and degenerate epochs.

- ``clean``: the best clean validation score (balanced accuracy, or macro AUROC for
  multi-label), as standard training selects; the default of the undefended baseline.
- ``robust``: the best score under the validation attack, i.e. early stopping against robust
  overfitting (Rice, Wong & Kolter, ICML 2020); the default of adversarial training.
- ``last``: the weights of the last epoch.

An epoch is **eligible** only if its clean predictions are not degenerate: no class takes more
than ``max_class_share`` of the validation predictions (single-label), and the clean score is
at least ``min_above_chance`` above the task's chance level (1/K balanced accuracy; 0.5 AUROC).
A model that always predicts one class has balanced accuracy 1/K clean and under every attack,
so without this rule a robust-score criterion prefers it to any real model whose robust score
drops below chance. Ineligible epochs get the selection score :data:`INELIGIBLE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_modules.core.tasks import chance_level

__all__ = ["CRITERIA", "INELIGIBLE", "chance_level", "eligibility"]

CRITERIA = ("clean", "robust", "last")
INELIGIBLE = -1.0


def eligibility(task: str, num_classes: int, clean_score: float,
                predicted_counts: torch.Tensor | None, *, max_class_share: float,
                min_above_chance: float) -> tuple[bool, str]:
    """``(eligible, reason)`` for one validation epoch; ``predicted_counts`` holds the number
    of clean predictions per class (single-label) or is ``None``."""
    chance = chance_level(task, num_classes)
    if clean_score < chance + min_above_chance:
        return False, (f"clean score {clean_score:.4f} is not {min_above_chance} above chance "
                       f"({chance:.4f})")
    if predicted_counts is not None and predicted_counts.sum() > 0:
        share = float(predicted_counts.max() / predicted_counts.sum())
        if share > max_class_share:
            top = int(predicted_counts.argmax())
            return False, f"{share:.1%} of the predictions are class {top}"
    return True, ""


def checkpoint_paths(trainer: L.Trainer) -> dict[str, str]:
    """``{"best_clean": ..., "best_robust": ..., "last": ...}`` as written by the callbacks."""
    out = {}
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor and cb.monitor.startswith("val/sel_") and cb.best_model_path:
            out["best_" + cb.monitor[len("val/sel_"):]] = cb.best_model_path
        if cb.monitor is None and cb.best_model_path:  # conf/callbacks/default.yaml: last
            out["last"] = cb.best_model_path
    return out


def choose_checkpoint(trainer: L.Trainer, paths: dict[str, str], module, criterion: str
                      ) -> dict[str, Any]:
    """The checkpoint to test for ``criterion`` (clean | robust | last), its epoch, and whether
    it is the fallback to ``last`` because no epoch was eligible."""
    path, fallback = paths.get("last", ""), False
    if criterion != "last":
        cb = next((c for c in trainer.checkpoint_callbacks
                   if c.monitor == f"val/sel_{criterion}"), None)
        if cb is not None and cb.best_model_path:
            fallback = cb.best_model_score is not None and \
                float(cb.best_model_score) <= INELIGIBLE
            path = path if fallback else cb.best_model_path
    epoch = None
    if path and Path(path).is_file():
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    return {"criterion": criterion, "checkpoint": path, "epoch": epoch, "fallback": fallback,
            "ineligible_epochs": {str(k): v for k, v in module.ineligible_epochs.items()}}
