"""Put a model into attack mode and restore it exactly afterwards.

During an attack the model is only a function to differentiate with respect to its input:
- parameters stop requiring gradients (no parameter ``.grad`` is ever written, no weight
  gradients are computed, and the optimizer or DDP never see attack-time graphs);
- ``mode='eval'`` switches every submodule to eval (BatchNorm uses its running statistics,
  Dropout is off); ``mode='train'`` keeps the current modes (BatchNorm normalises with batch
  statistics, as in Madry et al. 2018) and the BatchNorm running statistics are snapshotted and
  written back afterwards, so the attack leaves no trace in them. This covers every
  ``_NormBase`` layer: ``BatchNorm*d``, ``SyncBatchNorm`` and ``InstanceNorm`` with running
  statistics;
- under DDP with ``SyncBatchNorm`` (``trainer.sync_batchnorm=true``), ``mode='train'`` makes
  each ``SyncBatchNorm`` normalise with its own rank's batch during the attack, as
  ``BatchNorm`` does: crafting runs per rank on its own shard, with no all-gather of batch
  statistics in the forward pass and no all-reduce of their gradients in the backward pass. A
  rank may then run a different number of attack forwards than the others (early stop, a
  cascade, an empty batch) without waiting for them. (``mode='eval'`` uses the running
  statistics and never communicates.)
Everything is restored in ``finally``, also when the attack raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["attack_mode", "MODES"]

MODES = ("eval", "train")
_ABSENT = object()


def _local_batch_norm(self: nn.SyncBatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``SyncBatchNorm`` computed as a plain ``BatchNorm`` over this rank's batch alone."""
    return nn.modules.batchnorm._BatchNorm.forward(self, input)


@contextmanager
def attack_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Context manager that freezes ``model`` for an attack; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"attack model mode={mode!r} is not supported; choose one of {MODES}")
    training = {m: m.training for m in model.modules()}
    params = [p for p in model.parameters() if p.requires_grad]
    bn_state: list[tuple[nn.Module, str, torch.Tensor]] = []
    local: list[tuple[nn.Module, object]] = []  # SyncBatchNorm layers made rank-local
    try:
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    for name, buf in list(m._buffers.items()):
                        if buf is not None:
                            bn_state.append((m, name, buf))
                            m._buffers[name] = buf.detach().clone()
                if isinstance(m, nn.SyncBatchNorm):
                    local.append((m, m.__dict__.get("forward", _ABSENT)))
                    m.forward = _local_batch_norm.__get__(m)
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
        for m, forward in local:
            if forward is _ABSENT:
                del m.forward
            else:
                m.forward = forward
