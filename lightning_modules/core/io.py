"""Output files: plain-Python conversion and atomic JSON writing."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["to_builtin", "write_json"]


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
