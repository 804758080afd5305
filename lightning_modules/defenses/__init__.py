"""Adversarial-training defenses in plain PyTorch (no Lightning): each returns a batch's loss."""

from lightning_modules.defenses.adversarial_training import AdversarialTraining
from lightning_modules.defenses.base import Defense, DefenseOutput, NoDefense
from lightning_modules.defenses.misclassification_aware import MisclassificationAwareAT
from lightning_modules.defenses.multi_perturbation import MPAdvT
from lightning_modules.defenses.prior_guided import FGSMPGI
from lightning_modules.defenses.smoothing import GaussianAugmentation, SmoothAdv
from lightning_modules.defenses.trades import TRADES

__all__ = ["Defense", "DefenseOutput", "NoDefense", "AdversarialTraining", "TRADES",
           "MisclassificationAwareAT", "MPAdvT", "GaussianAugmentation", "SmoothAdv", "FGSMPGI"]
