"""Intermediate features of a backbone, clean against adversarial (Xu et al., MedIA 2021, the
analysis of how a perturbation grows through the network).

Stages are found by name: the small CNN's pooling blocks, a timm model's ``feature_info``
modules, else the inner network's top-level children. Activations come from forward hooks, so
any backbone works without a change to its code.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.models.backbones import NormalizedModel, SmallCNN

__all__ = ["feature_stages", "relative_feature_distance", "penultimate_features"]


def _inner(net: nn.Module) -> nn.Module:
    return net.net if isinstance(net, NormalizedModel) else net


def feature_stages(net: nn.Module) -> dict[str, nn.Module]:
    """Ordered ``{stage name: module}`` whose outputs are the stage activations, shallow to
    deep, ending with the penultimate features."""
    inner = _inner(net)
    if isinstance(inner, SmallCNN):
        pools = [m for m in inner.features if isinstance(m, nn.MaxPool2d)]
        return {**{f"block{i + 1}": m for i, m in enumerate(pools)}, "pooled": inner.pool}
    info = getattr(inner, "feature_info", None)
    if info:  # timm: [{"module": "layer1", "num_chs": ..., "reduction": ...}, ...]
        entries = info.info if hasattr(info, "info") else info
        return {e["module"]: inner.get_submodule(e["module"]) for e in entries}
    children = [(n, m) for n, m in inner.named_children() if any(True for _ in m.parameters())]
    return dict(children[:-1]) or dict(children)  # not the classifier head


def _activations(net: nn.Module, x: torch.Tensor, stages: dict[str, nn.Module]
                 ) -> dict[str, torch.Tensor]:
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=name: acts.__setitem__(
        n, (out[0] if isinstance(out, (tuple, list)) else out).detach().float().flatten(1)))
        for name, m in stages.items()]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return acts


def relative_feature_distance(net: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                              stages: dict[str, nn.Module] | None = None) -> dict[str, float]:
    """Per stage, the mean over images of ``||f(x') - f(x)||_2 / ||f(x)||_2`` (0 when the
    inputs are equal). The model should be in eval mode."""
    stages = stages or feature_stages(net)
    clean, adv = _activations(net, x, stages), _activations(net, x_adv, stages)
    return {name: float(((adv[name] - clean[name]).norm(dim=1)
                         / clean[name].norm(dim=1).clamp_min(1e-12)).mean())
            for name in stages if name in clean}


def penultimate_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` features the classifier head sees (the last stage of :func:`feature_stages`
    for the small CNN; the input of the last linear layer otherwise)."""
    inner = _inner(net)
    if isinstance(inner, SmallCNN):
        target = inner.pool
        grab = "output"
    else:
        linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("no linear classifier head found for the penultimate features")
        target, grab = linears[-1], "input"
    out: list[torch.Tensor] = []

    def hook(_m, inputs, output):
        t = inputs[0] if grab == "input" else output
        out.append(t.detach().float().flatten(1))

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    return out[-1]
