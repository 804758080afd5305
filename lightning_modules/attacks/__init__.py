"""Adversarial attacks in plain PyTorch (no Lightning): one file per family.

``mode`` (the model during an attack), ``base`` (the call contract, input gradients), ``pgd``
(PGD), ``fgsm`` (FGSM, N-FGSM), ``autoattack`` (AutoAttack through the authors'
``pyautoattack``), ``fast`` (the fast default evaluation attack), ``gap`` (generative adversarial perturbations). The threat model (L-inf / L2
balls, eps parsing) is ``lightning_modules.core.threat``. Each attack is configured once in
``conf/attack/``; its constructor takes every option (no defaults in code), and
``attack_from_config("pgd", eps=..., steps=...)`` builds one from that YAML without Hydra.
"""

from lightning_modules.attacks.autoattack import AutoAttack
from lightning_modules.attacks.base import Attack, input_grad
from lightning_modules.attacks.config import attack_config, attack_from_config
from lightning_modules.attacks.fast import FastAttack
from lightning_modules.attacks.fgsm import FGSM, NFGSM
from lightning_modules.attacks.gap import GAP
from lightning_modules.attacks.mode import MODES, attack_mode
from lightning_modules.attacks.pgd import PGD
from lightning_modules.core.threat import L2Ball, LinfBall, ThreatModel, make_threat, parse_eps

__all__ = ["attack_config", "attack_from_config", "Attack", "AutoAttack", "FastAttack", "input_grad", "FGSM", "GAP", "NFGSM", "PGD", "MODES", "attack_mode", "L2Ball",
           "LinfBall", "ThreatModel", "make_threat", "parse_eps"]
