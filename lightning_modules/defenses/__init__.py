"""Adversarial-training defenses in plain PyTorch (no Lightning): each returns a batch's loss."""

from .base import Defense, DefenseOutput, NoDefense
from .adversarial_training import AdversarialTraining

__all__ = ["Defense", "DefenseOutput", "NoDefense", "AdversarialTraining"]
