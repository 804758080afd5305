"""Adversarial-training defenses in plain PyTorch (no Lightning): each returns a batch's loss."""

from .adversarial_training import AdversarialTraining
from .base import Defense, DefenseOutput, NoDefense
from .misclassification_aware import MisclassificationAwareAT
from .multi_perturbation import MPAdvT
from .trades import TRADES

__all__ = ["Defense", "DefenseOutput", "NoDefense", "AdversarialTraining", "TRADES",
           "MisclassificationAwareAT", "MPAdvT"]
