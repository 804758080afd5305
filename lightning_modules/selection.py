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

import torch

from .tasks import check_task

__all__ = ["CRITERIA", "INELIGIBLE", "chance_level", "eligibility"]

CRITERIA = ("clean", "robust", "last")
INELIGIBLE = -1.0


def chance_level(task: str, num_classes: int) -> float:
    """Score of a constant or random predictor: 1/K balanced accuracy, 0.5 macro AUROC."""
    return 1.0 / num_classes if check_task(task) == "multiclass" else 0.5


def eligibility(task: str, num_classes: int, clean_score: float,
                predicted_counts: torch.Tensor | None, max_class_share: float = 0.95,
                min_above_chance: float = 0.02) -> tuple[bool, str]:
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
