"""Put a model into attack mode and restore it exactly afterwards.

During an attack the model is only a function to differentiate with respect to its input:
- parameters stop requiring gradients (no parameter ``.grad`` is ever written, no weight
  gradients are computed, and the optimizer or DDP never see attack-time graphs);
- ``mode='eval'`` switches every submodule to eval (BatchNorm uses its running statistics,
  Dropout is off); ``mode='train'`` keeps the current modes (BatchNorm normalises with batch
  statistics, as in Madry et al. 2018) and the BatchNorm running statistics are snapshotted and
  written back afterwards, so the attack leaves no trace in them.
Everything is restored in ``finally``, also when the attack raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["attack_mode", "MODES"]

MODES = ("eval", "train")


@contextmanager
def attack_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Context manager that freezes ``model`` for an attack; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"attack model mode={mode!r} is not supported; choose one of {MODES}")
    training = {m: m.training for m in model.modules()}
    params = [p for p in model.parameters() if p.requires_grad]
    bn_state: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    for name, buf in list(m._buffers.items()):
                        if buf is not None:
                            bn_state.append((m, name, buf))
                            m._buffers[name] = buf.detach().clone()
        for p in params:
            p.requires_grad_(False)
        if mode == "eval":
            model.eval()
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, was_training in training.items():
            m.training = was_training
        for m, name, buf in bn_state:
            m._buffers[name] = buf
