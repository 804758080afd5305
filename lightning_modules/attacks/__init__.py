"""Adversarial attacks in plain PyTorch (no Lightning): one file per family.

``threat`` (L-inf / L2 balls), ``mode`` (the model during an attack), ``base`` (the call
contract, input gradients), ``pgd`` (PGD), ``fgsm`` (FGSM, N-FGSM), ``autoattack`` (AutoAttack
through the authors' ``pyautoattack``), ``gap`` (generative adversarial perturbations). Each is configured once in ``conf/attack/``.
"""

from .autoattack import AutoAttack
from .base import Attack, input_grad
from .fgsm import FGSM, NFGSM
from .gap import GAP
from .mode import MODES, attack_mode
from .pgd import PGD
from .threat import L2Ball, LinfBall, ThreatModel, make_threat, parse_eps

__all__ = ["Attack", "AutoAttack", "input_grad", "FGSM", "GAP", "NFGSM", "PGD", "MODES", "attack_mode", "L2Ball",
           "LinfBall", "ThreatModel", "make_threat", "parse_eps"]
