"""Running one job of a Hydra multirun: its error written beside it so the sweep goes on,
and wandb always finished (multiruns hang on an open run)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightning_modules.core.errors import ConfigError

__all__ = ["finish_wandb", "in_multirun", "run_job"]

log = logging.getLogger(__name__)


def finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(fn: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any] | None:
    """One job of a multirun: its error is written to ``error.txt`` in its folder and logged,
    and the sweep goes on (the sweep summary lists it)."""
    try:
        return fn(cfg)
    except Exception as err:  # noqa: BLE001 - one job's failure must not stop the sweep
        line = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        log.exception("job failed: %s", line)
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(line.splitlines()[0] if line else type(err).__name__)
        print(f"medrobust: error: {line}", file=sys.stderr, flush=True)
        return None
