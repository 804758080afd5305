"""GAP, generative adversarial perturbations: Poursaeed, Katsman, Gao & Belongie, CVPR 2018;
the second attack of Xu et al. (Medical Image Analysis 2021).

A generator, trained against a frozen classifier, maps an image to a perturbation (``image``:
a ResNet generator, Johnson et al. 2016) or learns one pattern for all images (``universal``).
Its raw output is rescaled to the radius, per image: ``delta = eps * g / ||g||`` (L-inf: the
largest pixel of ``delta`` is exactly ``eps``; L2: its norm is ``eps``), then
``x_adv = clip(x + delta, 0, 1)``. At test time the attack is one forward pass, no gradients.

The objective (:func:`gap_loss`, minimised) is the one of the study's released code:
single-label, cross-entropy toward the least likely class of the clean prediction;
multi-label, BCE toward the flipped clean predictions. The generator is fitted by
:class:`~lightning_modules.evaluation.gap_fit.GAPModule` (a Lightning fit of its own; ``evaluate.py`` runs it
on the training split, saves the generator and reuses it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_modules.attacks.base import Attack
from lightning_modules.core.tasks import LossFn, Task

__all__ = ["GAP", "ResnetGenerator", "UniversalPattern", "build_generator", "gap_loss",
           "scale_to_ball", "KINDS"]

KINDS = ("image", "universal")


def _block(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(ch, ch, 3), nn.Conv2d(ch, ch, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """The image-dependent generator of GAP (Johnson et al.'s ResNet generator, smaller):
    a 7x7 conv, two stride-2 downsamplings, ``blocks`` residual blocks, two upsamplings and a
    7x7 conv to ``in_chans`` channels with tanh. Any image size (the output is resized back)."""

    def __init__(self, in_chans: int = 3, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        layers = [_block(in_chans, width, 7), _block(width, 2 * width, 3, 2),
                  _block(2 * width, 4 * width, 3, 2)]
        layers += [_Residual(4 * width) for _ in range(blocks)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _block(4 * width, 2 * width, 3),
                   nn.Upsample(scale_factor=2, mode="nearest"), _block(2 * width, width, 3),
                   nn.Conv2d(width, in_chans, 7, padding=3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


class UniversalPattern(nn.Module):
    """Universal GAP: one learned pattern ``(C, H, W)``, the same for every image."""

    def __init__(self, in_chans: int, image_size: int) -> None:
        super().__init__()
        self.pattern = nn.Parameter(torch.randn(1, in_chans, image_size, image_size) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.pattern.shape[1:]:
            raise ValueError(f"universal GAP pattern {tuple(self.pattern.shape[1:])} does not fit "
                             f"images {tuple(x.shape[1:])}")
        return self.pattern.expand(x.shape[0], -1, -1, -1)


def build_generator(kind: str, in_chans: int, image_size: int, width: int = 16,
                    blocks: int = 3) -> nn.Module:
    if kind == "image":
        return ResnetGenerator(in_chans, width, blocks)
    if kind == "universal":
        return UniversalPattern(in_chans, image_size)
    raise ValueError(f"GAP kind={kind!r} must be one of {KINDS}")


def scale_to_ball(raw: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``eps * raw / ||raw||`` per image: the largest pixel (L-inf) or the norm (L2) is eps."""
    flat = raw.flatten(1).float()
    size = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    scale = eps / size.clamp_min(1e-12)
    return (raw.float() * scale.view(-1, *([1] * (raw.dim() - 1)))).to(raw.dtype)


def gap_loss(logits: torch.Tensor, clean_logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Per-sample loss the generator minimises: CE toward the least likely clean class
    (single-label), or BCE toward the flipped clean predictions (multi-label)."""
    if task.single_label:
        return F.cross_entropy(logits.float(), clean_logits.argmin(dim=1), reduction="none")
    flipped = (clean_logits <= 0).float()
    return F.binary_cross_entropy_with_logits(logits.float(), flipped,
                                              reduction="none").mean(dim=1)


class GAP(Attack):
    """Args:
        eps, norm: the ball the generator's output is rescaled to ([0, 1] pixel units); a
            generator trained at one eps is applied at any radius of the grid by rescaling.
        kind: ``image`` (image-dependent ResNet generator) or ``universal`` (one pattern).
        width, blocks: the ResNet generator's base channels and residual blocks.
        epochs, lr, max_batches: its fit (Adam, betas 0.5/0.999 as GAP; ``max_batches`` per
            epoch, ``None`` = the whole training split).
        path: a saved generator to load; ``None`` = evaluate.py's default file beside the
            report (fitted when missing, reused when present).
        generator: the fitted generator (set by :meth:`with_generator`).
    """

    name = "gap"

    def __init__(self, eps: float | str, norm: str, kind: str, width: int, blocks: int,
                 epochs: int, lr: float, max_batches: int | None, path: str | None,
                 model_mode: str, generator: nn.Module | None = None) -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        if kind not in KINDS:
            raise ValueError(f"GAP kind={kind!r} must be one of {KINDS}")
        for key, val in (("width", width), ("blocks", blocks), ("epochs", epochs)):
            if isinstance(val, bool) or int(val) != val or val < (0 if key == "blocks" else 1):
                raise ValueError(f"GAP {key}={val!r} must be a positive integer")
        if max_batches is not None and (int(max_batches) != max_batches or max_batches < 1):
            raise ValueError(f"GAP max_batches={max_batches!r} must be a positive integer or null")
        if not float(lr) > 0:
            raise ValueError(f"GAP lr={lr!r} must be > 0")
        self.kind, self.width, self.blocks = kind, int(width), int(blocks)
        self.epochs, self.lr = int(epochs), float(lr)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.path = path
        self.generator = generator

    def _kwargs(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "kind": self.kind, "width": self.width,
                "blocks": self.blocks, "epochs": self.epochs, "lr": self.lr,
                "max_batches": self.max_batches, "path": self.path,
                "model_mode": self.model_mode, "generator": self.generator}

    def describe(self) -> dict:
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "kind": self.kind,
                **({"width": self.width, "blocks": self.blocks} if self.kind == "image" else {}),
                "epochs": self.epochs, "lr": self.lr, "max_batches": self.max_batches}

    def signature(self) -> dict:
        """What a saved generator must match to be reused: its settings and the radius it was
        fitted at (a generator fitted at one eps is not reused at another)."""
        return {"kind": self.kind, "eps": self.eps, "width": self.width, "blocks": self.blocks, "norm": self.norm,
                "epochs": self.epochs, "lr": self.lr, "max_batches": self.max_batches}

    def with_generator(self, generator: nn.Module) -> GAP:
        return self.replace(generator=generator)

    def new_generator(self, in_chans: int, image_size: int) -> nn.Module:
        return build_generator(self.kind, in_chans, image_size, self.width, self.blocks)

    def apply(self, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``clip(x + eps * g(x) / ||g(x)||, 0, 1)``, differentiable in the generator."""
        return (x + scale_to_ball(generator(x), self.eps, self.norm)).clamp(0.0, 1.0)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn) -> torch.Tensor:
        if self.generator is None:
            raise ValueError("GAP has no generator: evaluate.py fits one on the training split "
                             "(or give attacks.<name>.path=<saved generator>)")
        gen = self.generator.to(x.device)  # a no-op after the first call
        was_training = gen.training
        gen.eval()
        try:
            with torch.no_grad():
                return self.apply(gen, x).detach()
        finally:
            gen.train(was_training)
