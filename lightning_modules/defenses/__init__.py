"""Adversarial-training defenses in plain PyTorch (no Lightning): each returns a batch's loss."""

from .adversarial_training import AdversarialTraining
from .base import Defense, DefenseOutput, NoDefense

__all__ = ["Defense", "DefenseOutput", "NoDefense", "AdversarialTraining"]
