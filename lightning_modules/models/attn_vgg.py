"""The attention-guided VGG of Yan, Kawahara & Hamarneh, "Melanoma Recognition via Visual
Attention", IPMI 2019: the dermoscopy model of Xu et al. (MedIA 2021).

VGG-16 with batch norm (5 blocks of 2, 2, 3, 3, 3 conv-BN-ReLU, each followed by 2x2 max-pool).
The global feature ``g`` is the average of the last pooled map. Two grid-attention blocks (after
Jetley et al., ICLR 2018) score every position of the pool-3 and pool-4 maps against ``g``'s map
and pool each map with its attention; the classifier reads the concatenation
``[g, g_pool3, g_pool4]``::

    c_s = phi(ReLU(W_l l_s + up(W_g G)_s))          (one score per position s)
    a   = softmax_s(c)  (normalize=True) or sigmoid(c)
    g_l = sum_s a_s l_s (softmax) or mean_s a_s l_s (sigmoid)

``width`` sets the first block's channels (64 in VGG-16; 8-16 run on a CPU at 64-128 px).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionBlock", "AttnVGG", "load_vgg16_bn_features"]

# (convolutions, channels as a multiple of width) per block: 64-128-256-512-512 at width 64
VGG16_BLOCKS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))


class AttentionBlock(nn.Module):
    """Grid attention of local features ``l`` (N, C_l, H, W) guided by a coarser global map
    ``G`` (N, C_g, h, w); returns the attended feature (N, C_l) and the map (N, 1, H, W)."""

    def __init__(self, local_chans: int, global_chans: int, attn_chans: int,
                 normalize: bool = True) -> None:
        super().__init__()
        self.local_proj = nn.Conv2d(local_chans, attn_chans, 1, bias=False)
        self.global_proj = nn.Conv2d(global_chans, attn_chans, 1, bias=False)
        self.score = nn.Conv2d(attn_chans, 1, 1)
        self.normalize = normalize

    def forward(self, local: torch.Tensor, glob: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        guide = F.interpolate(self.global_proj(glob), size=local.shape[-2:], mode="bilinear",
                              align_corners=False)
        scores = self.score(F.relu(self.local_proj(local) + guide))
        if self.normalize:
            attn = scores.flatten(2).softmax(-1).view_as(scores)
            pooled = (attn * local).flatten(2).sum(-1)
        else:
            attn = torch.sigmoid(scores)
            pooled = (attn * local).mean((2, 3))
        return pooled, attn


class AttnVGG(nn.Module):
    """VGG-16-BN with attention on pool-3 and pool-4 (see the module docstring).

    Args:
        num_classes: outputs (logits).
        in_chans: input channels.
        width: channels of the first block (64 = VGG-16); later blocks 2x, 4x, 8x, 8x.
        attn_chans: channels of the attention projections (default ``4 * width``, 256 in VGG-16).
        normalize_attn: softmax attention (True) or sigmoid attention (False).
        dropout: dropout on the concatenated feature before the classifier.
    Inputs need at least 32x32 pixels (five 2x2 poolings).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 64,
                 attn_chans: int | None = None, normalize_attn: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"backbone.width={width} must be >= 1")
        blocks, c_in = [], in_chans
        for n_conv, mult in VGG16_BLOCKS:
            layers: list[nn.Module] = []
            for _ in range(n_conv):
                layers += [nn.Conv2d(c_in, width * mult, 3, padding=1),
                           nn.BatchNorm2d(width * mult), nn.ReLU(inplace=True)]
                c_in = width * mult
            layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        c3, c4, c5 = width * 4, width * 8, width * 8
        attn_chans = attn_chans or 4 * width
        self.attn3 = AttentionBlock(c3, c5, attn_chans, normalize_attn)
        self.attn4 = AttentionBlock(c4, c5, attn_chans, normalize_attn)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c5 + c3 + c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for block in self.blocks:
            x = block(x)
            pooled.append(x)
        pool3, pool4, pool5 = pooled[2], pooled[3], pooled[4]
        g = pool5.mean((2, 3))
        g3, _ = self.attn3(pool3, pool5)
        g4, _ = self.attn4(pool4, pool5)
        return self.classifier(self.dropout(torch.cat([g, g3, g4], dim=1)))

    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool-3 and pool-4 attention maps, (N, 1, H/8, W/8) and (N, 1, H/16, W/16)."""
        pooled = []
        for block in self.blocks:
            x = block(x)
            pooled.append(x)
        return self.attn3(pooled[2], pooled[4])[1], self.attn4(pooled[3], pooled[4])[1]


def load_vgg16_bn_features(model: AttnVGG, path: str | Path) -> None:
    """Load the convolution and batch-norm weights of a torchvision/timm ``vgg16_bn`` state
    dict (a local ``.pth``/``.bin``/``.safetensors`` file; ``features.*`` keys) into ``model``,
    layer by layer in order; shapes must match (``width`` 64, 3 input channels). The attention
    blocks and the classifier keep their initialisation."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    index = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.")})
    ours = [m for m in model.blocks.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    theirs = [i for i in index if f"features.{i}.weight" in state]
    if len(theirs) != len(ours):
        raise ValueError(f"backbone.weights_path={str(path)!r}: {len(theirs)} weighted "
                         f"features.* layers, the attention VGG has {len(ours)} (vgg16_bn expected)")
    for module, i in zip(ours, theirs, strict=True):
        sub = {k[len(f"features.{i}."):]: v for k, v in state.items()
               if k.startswith(f"features.{i}.")}
        try:
            module.load_state_dict(sub, strict=False)
        except RuntimeError as err:
            raise ValueError(f"backbone.weights_path={str(path)!r}: features.{i} does not fit "
                             f"(is backbone.width 64?): {str(err).splitlines()[-1].strip()}"
                             ) from err
