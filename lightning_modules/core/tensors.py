"""Tensor layout helpers."""

from __future__ import annotations

import torch

__all__ = ["to_memory_format"]


def to_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in ``memory_format`` (channels-last runs); other tensors as-is."""
    if x.dim() == 4 and memory_format is torch.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x
