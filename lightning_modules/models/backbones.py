"""Backbones: a small CNN (the skin-cancer study's kind of model), the attention-guided VGG of
the dermoscopy task (:mod:`.attn_vgg`) and any timm model by name.

Every backbone is wrapped in :class:`NormalizedModel`, so the model takes images in [0, 1] and
normalisation (mean/std per channel) happens inside it: epsilon means the same thing for every
backbone, and attacks never see normalised pixels.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["NormalizedModel", "SmallCNN", "attn_vgg", "check_input_size", "small_cnn", "timm_model"]


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)`` with ``mean``/``std`` as buffers; ``x`` in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 in_chans: int) -> None:
        super().__init__()
        mean_t, std_t = _per_channel(mean, in_chans, "mean"), _per_channel(std, in_chans, "std")
        if (std_t <= 0).any():
            raise ValueError(f"backbone.std={list(std)} must be > 0")
        self.net = net
        self.in_chans = in_chans
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _per_channel(values: Sequence[float], in_chans: int, key: str) -> torch.Tensor:
    vals = [float(v) for v in values]
    if len(vals) == in_chans:
        return torch.tensor(vals)
    if len(vals) == 1:
        return torch.tensor(vals * in_chans)
    if in_chans == 1 and len(vals) == 3:  # RGB statistics for a grayscale input: average
        return torch.tensor([sum(vals) / 3.0])
    raise ValueError(f"backbone.{key} has {len(vals)} values but in_chans={in_chans}")


class SmallCNN(nn.Module):
    """A compact VGG-style CNN: 3 blocks of (conv-BN-ReLU) x2 + max-pool, then a linear head.

    Close to the small CNNs used in the HAM10000 FGSM/PGD adversarial-training study; works for
    any input size (global average pooling before the head).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        chans = [in_chans, width, width * 2, width * 4]
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(chans[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def small_cnn(num_classes: int, in_chans: int = 3, width: int = 32, dropout: float = 0.0,
              mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> NormalizedModel:
    """The default backbone: :class:`SmallCNN` behind a normaliser."""
    _check_shape_args(num_classes, in_chans)
    return NormalizedModel(SmallCNN(num_classes, in_chans, width, dropout), mean, std, in_chans)


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def local_weights(weights_path: str) -> tuple[Path, dict]:
    """``(weights file, pretrained config found beside it)`` of ``backbone.weights_path``: a
    file, or a folder holding one weights file (a Hugging Face snapshot of a timm model:
    ``model.safetensors`` or ``pytorch_model.bin``, with its ``config.json`` whose
    ``pretrained_cfg`` gives the normalisation statistics)."""
    path = Path(weights_path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        preferred = [p for p in files if p.name in ("model.safetensors", "pytorch_model.bin")]
        files = preferred[:1] or files
        if len(files) != 1:
            raise FileNotFoundError(
                f"backbone.weights_path={str(path)!r} is a folder with "
                f"{'no' if not files else len(files)} weights files "
                f"({'/'.join(WEIGHT_SUFFIXES)}); name the file")
        config = path / "config.json"
        extra = json.loads(config.read_text()).get("pretrained_cfg", {}) \
            if config.is_file() else {}
        return files[0], extra
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights_path={str(path)!r} does not exist")
    return path, {}


def timm_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    weights_path: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> NormalizedModel:
    """Any ``timm`` model by name, behind a normaliser.

    ``pretrained``: with ``weights_path`` (a local file, ``.safetensors``/``.pth``/``.pt``/
    ``.bin``, or a folder holding one, e.g. a Hugging Face snapshot), the weights are read from
    there; without it, timm's own loading (its Hugging Face hub or URL, through the local cache,
    so ``HF_HUB_OFFLINE=1`` works from a filled cache). When neither can be had: one line naming
    both options. timm resizes the classifier head to ``num_classes`` and the stem to
    ``in_chans``. ``mean``/``std`` default to the pretrained config of the weights (ImageNet's
    statistics for most), applied inside the model (inputs stay in [0, 1]).
    """
    import timm

    _check_shape_args(num_classes, in_chans)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(f"backbone.name={name!r} is not a timm model{hint}")
    overlay = None
    if weights_path and not pretrained:
        raise ValueError("backbone.weights_path is set but backbone.pretrained=false")
    if weights_path:
        path, found_cfg = local_weights(weights_path)
        overlay = {**{k: found_cfg[k] for k in ("mean", "std") if k in found_cfg},
                   "file": str(path)}
    try:
        net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                in_chans=in_chans, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as err:  # the hub's errors (offline, no cache, HTTP) have no common base
        if not pretrained or weights_path:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"backbone.pretrained=true: timm could not get the pretrained weights of {name!r} "
            f"({type(err).__name__}: {first}); offline, set backbone.weights_path to a local "
            "weights file or folder, or backbone.pretrained=false") from None  # named above
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))
    std = std if std is not None else cfg.get("std", (0.229, 0.224, 0.225))
    return NormalizedModel(net, mean, std, in_chans)


def _check_shape_args(num_classes: int, in_chans: int) -> None:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if int(in_chans) < 1:
        raise ValueError(f"in_chans={in_chans} must be >= 1")


def attn_vgg(num_classes: int, in_chans: int = 3, width: int = 64,
             attn_chans: int | None = None, normalize_attn: bool = True, dropout: float = 0.0,
             weights_path: str | None = None, mean: Sequence[float] = (0.485, 0.456, 0.406),
             std: Sequence[float] = (0.229, 0.224, 0.225)) -> NormalizedModel:
    """The attention-guided VGG-16-BN of Yan et al. (IPMI 2019), behind a normaliser; see
    :mod:`lightning_modules.models.attn_vgg`. ``weights_path``: a local ``vgg16_bn`` state dict for the
    convolutional part (``width`` 64); nothing is downloaded."""
    from lightning_modules.models.attn_vgg import AttnVGG, load_vgg16_bn_features

    _check_shape_args(num_classes, in_chans)
    net = AttnVGG(num_classes, in_chans, width, attn_chans, normalize_attn, dropout)
    if weights_path:
        load_vgg16_bn_features(net, weights_path)
    return NormalizedModel(net, mean, std, in_chans)


@torch.no_grad()
def check_input_size(net: nn.Module, in_chans: int, image_size: int) -> None:
    """One forward pass of a blank ``image_size`` image in eval mode (modes restored): a model
    that cannot take that size (e.g. Inception-v3 below 75 px) fails here, with one line."""
    training = net.training
    net.eval()
    try:
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        net(torch.zeros(1, in_chans, image_size, image_size, device=device))
    except RuntimeError as err:
        raise ValueError(f"the backbone cannot take {image_size}x{image_size} images "
                         f"(datamodule.image_size): {str(err).splitlines()[0]}") from err
    finally:
        net.train(training)
