"""Adversarial attacks in plain PyTorch (no Lightning): one file per family.

``threat`` (L-inf / L2 balls), ``mode`` (the model during an attack), ``base`` (the call
contract, input gradients), ``pgd`` (PGD), ``fgsm`` (FGSM, N-FGSM), ``autoattack`` (AutoAttack
through the authors' ``pyautoattack``), ``gap`` (generative adversarial perturbations). Each is configured once in ``conf/attack/``.
"""

from lightning_modules.attacks.autoattack import AutoAttack
from lightning_modules.attacks.base import Attack, input_grad
from lightning_modules.attacks.fgsm import FGSM, NFGSM
from lightning_modules.attacks.gap import GAP
from lightning_modules.attacks.mode import MODES, attack_mode
from lightning_modules.attacks.pgd import PGD
from lightning_modules.core.threat import L2Ball, LinfBall, ThreatModel, make_threat, parse_eps

__all__ = ["Attack", "AutoAttack", "input_grad", "FGSM", "GAP", "NFGSM", "PGD", "MODES", "attack_mode", "L2Ball",
           "LinfBall", "ThreatModel", "make_threat", "parse_eps"]
