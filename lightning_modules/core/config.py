"""Hydra glue: ``_target_`` nodes instantiated with the key named in errors, and the
OmegaConf resolvers of eps fractions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.errors import ConfigError, root_cause

__all__ = ["CONF_DIR", "MOVED_TARGETS", "compose_file", "upgrade_targets", "instantiate_node", "instantiate_dict",
           "register_resolvers"]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the project's Hydra configs


def instantiate_node(cfg: DictConfig, key: str, drop: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[key], **kwargs)``; errors become one :class:`ConfigError`
    that names the config key and the underlying message. ``drop``: keys of the node that are
    not constructor arguments (read by the caller)."""
    node = cfg.get(key)
    if node is None:
        raise ConfigError(f"config key '{key}' is missing")
    try:
        if drop:
            node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                    if k not in drop}
        # _convert_="all": lists and dicts reach constructors as plain Python (they end up in
        # checkpoints, which load with weights_only=True)
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the key named
        cause = root_cause(err)
        raise ConfigError(f"{key}: {type(cause).__name__}: {cause}") from err


def instantiate_dict(cfg: DictConfig, key: str, skip: tuple[str, ...] = ()) -> list[Any]:
    """Instantiate every ``_target_`` node of ``cfg[key]`` (a dict of callbacks or loggers) but
    those named in ``skip``."""
    node = cfg.get(key)
    if not node:
        return []
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key} must be a dict of _target_ nodes, got {type(node).__name__}")
    out = []
    for name, sub in node.items():
        if isinstance(sub, DictConfig) and "_target_" in sub and name not in skip:
            out.append(instantiate_node(node, name))
    return out


def register_resolvers() -> None:
    """OmegaConf resolvers (fractions parsed, never ``eval``):
    ``${eps:8/255}`` -> 0.03137; ``${mul:8/255,0.5}`` -> 0.01569 (eps times a factor)."""
    from lightning_modules.core.threat import parse_eps

    if not OmegaConf.has_resolver("eps"):
        OmegaConf.register_new_resolver("eps", lambda v: parse_eps(v))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver(
            "mul", lambda v, k: parse_eps(v, "eps") * parse_eps(k, "factor"))


def compose_file(path: Path) -> DictConfig:
    """A YAML file of ``conf/`` merged with the same-group files of its defaults list (what
    Hydra composes for one group option, without Hydra: for library use and tests)."""
    raw = OmegaConf.load(path)
    defaults = list(raw.pop("defaults", None) or ["_self_"])
    out = OmegaConf.create()
    for entry in defaults:
        if entry == "_self_":
            out = OmegaConf.merge(out, raw)
            continue
        name, _, package = str(entry).partition("@")
        if package not in ("", "_here_") or not isinstance(entry, str):
            raise ValueError(f"{path}: unsupported defaults entry {entry!r}")
        out = OmegaConf.merge(out, compose_file(path.parent / f"{name}.yaml"))
    if "_self_" not in defaults:
        out = OmegaConf.merge(out, raw)
    return out


# ``_target_`` prefixes of classes that moved; configs stored in older checkpoints name the old
# place (the 2026-12 restructuring put the backbones in ``lightning_modules.models``)
MOVED_TARGETS = {"lightning_modules.backbones.": "lightning_modules.models.backbones."}


def upgrade_targets(node: Any) -> Any:
    """A stored config (plain dicts and lists) with moved ``_target_`` s renamed in place."""
    if isinstance(node, dict):
        target = node.get("_target_")
        for old, new in MOVED_TARGETS.items():
            if isinstance(target, str) and target.startswith(old):
                node["_target_"] = new + target[len(old):]
        for value in node.values():
            upgrade_targets(value)
    elif isinstance(node, list):
        for value in node:
            upgrade_targets(value)
    return node
