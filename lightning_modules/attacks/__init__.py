"""Adversarial attacks in plain PyTorch (no Lightning): threat models, losses, FGSM, PGD."""

from .losses import (
    TASKS,
    LossFn,
    bce_per_sample,
    cross_entropy_per_sample,
    loss_for_task,
    predictions_wrong,
    task_of,
)
from .mode import MODES, attack_mode
from .pgd import FGSM, NFGSM, PGD, Attack
from .threat import L2Ball, LinfBall, ThreatModel, make_threat, parse_eps

__all__ = [
    "TASKS", "LossFn", "bce_per_sample", "cross_entropy_per_sample", "loss_for_task",
    "predictions_wrong", "task_of", "MODES", "attack_mode", "FGSM", "NFGSM", "PGD", "Attack", "L2Ball", "LinfBall",
    "ThreatModel", "make_threat", "parse_eps",
]
