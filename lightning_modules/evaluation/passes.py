"""Forward and backward passes counted on the model, per image: the cost unit of attacks that
does not depend on the machine (Liu et al., "Practical Evaluation of Adversarial Robustness via
Adaptive Auto Attack", CVPR 2022, compare attacks by their forward and backward passes).

:class:`PassCounter` wraps a network; every forward call adds its batch size to ``forward``
and, when its output takes part in a backward pass (``torch.autograd.grad`` or
``.backward()``, ours or a third-party attack's), the batch size to ``backward``. The wrapper is
transparent: same parameters, modes and outputs as the network it wraps.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PassCounter"]


class PassCounter(nn.Module):
    """Counts the images passed forward and backward through ``net``.

    Example:
        >>> counted = PassCounter(net)
        >>> x_adv = attack(counted, x, y)
        >>> counted.forward_images, counted.backward_images
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.forward_images = 0
        self.backward_images = 0

    def counts(self) -> tuple[int, int]:
        """``(forward, backward)`` images so far."""
        return self.forward_images, self.backward_images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        n = int(x.shape[0])
        self.forward_images += n
        if out.requires_grad:
            def count_backward(grad: torch.Tensor) -> None:
                self.backward_images += n
            out.register_hook(count_backward)
        return out
