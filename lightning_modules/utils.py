"""Small helpers shared by ``train.py`` and ``evaluate.py``: config errors, instantiation of
``_target_`` dicts, eps formatting and the output files of a run."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "instantiate_node",
    "instantiate_dict",
    "format_eps",
    "write_json",
    "register_resolvers",
    "exit_on_config_error",
    "to_memory_format",
]


class ConfigError(Exception):
    """Bad input found at start-up; the message names the key, file or value."""


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


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
        cause = _root_cause(err)
        raise ConfigError(f"{key}: {type(cause).__name__}: {cause}") from err


def instantiate_dict(cfg: DictConfig, key: str) -> list[Any]:
    """Instantiate every ``_target_`` node of ``cfg[key]`` (a dict of callbacks or loggers)."""
    node = cfg.get(key)
    if not node:
        return []
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key} must be a dict of _target_ nodes, got {type(node).__name__}")
    out = []
    for name, sub in node.items():
        if isinstance(sub, DictConfig) and "_target_" in sub:
            out.append(instantiate_node(node, name))
    return out


def format_eps(eps: float) -> str:
    """``8/255`` for multiples of 1/255, else the number (``0.5``)."""
    if eps == 0:
        return "0"
    k = eps * 255.0
    if math.isclose(k, round(k), abs_tol=1e-6):
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def to_builtin(obj: Any) -> Any:
    """Tensors, numpy scalars and OmegaConf nodes to plain Python for JSON."""
    if isinstance(obj, DictConfig) or OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_builtin(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return to_builtin(obj.item())
        except (ValueError, RuntimeError):
            return to_builtin(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # NaN/inf are not JSON; null says "no number"
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON via a temporary file (no half-written file on a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_builtin(data), indent=2, sort_keys=False, allow_nan=False)
                   + "\n")
    tmp.replace(path)
    return path


def register_resolvers() -> None:
    """OmegaConf resolvers (fractions parsed, never ``eval``):
    ``${eps:8/255}`` -> 0.03137; ``${mul:8/255,0.5}`` -> 0.01569 (eps times a factor)."""
    from .attacks.threat import parse_eps

    if not OmegaConf.has_resolver("eps"):
        OmegaConf.register_new_resolver("eps", lambda v: parse_eps(v))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver(
            "mul", lambda v, k: parse_eps(v, "eps") * parse_eps(k, "factor"))


@contextmanager
def exit_on_config_error(log: logging.Logger) -> Iterator[None]:
    """For entry points: a :class:`ConfigError` becomes one line on stderr and exit code 2
    (messages of several lines, as OmegaConf's with their ``full_key:`` detail, are joined)."""
    try:
        yield
    except ConfigError as err:
        line = "; ".join(part.strip() for part in str(err).splitlines() if part.strip())
        log.error("%s", line)
        print(f"medrobust: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def to_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in ``memory_format`` (channels-last runs); other tensors as-is."""
    if x.dim() == 4 and memory_format is torch.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x
