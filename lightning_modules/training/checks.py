"""Checks of a training config before anything is built or written: values in range (one
line naming the key) and a resumed checkpoint that fits the network this run builds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.config import upgrade_targets
from lightning_modules.core.errors import ConfigError

__all__ = ["VALUE_RULES", "RESUME_KEYS", "THREAT_KEYS", "check_values", "check_resume"]

THREAT_KEYS = {"norm", "eps", "train_steps"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# (key, test, what it must be): checked before anything is built, one line each
VALUE_RULES: tuple[tuple[str, Any, str], ...] = (
    ("seed", lambda v: v is None or _is_int(v), "an integer or null"),
    ("module.optimizer.lr", lambda v: _is_num(v) and v > 0, "a number > 0"),
    ("module.optimizer.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("datamodule.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("datamodule.eval_batch_size", lambda v: v is None or (_is_int(v) and v >= 1),
     "an integer >= 1 or null"),
    ("datamodule.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("datamodule.sampler", lambda v: v in (None, "none", "weighted"), "null or 'weighted'"),
    ("backbone.width", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("trainer.max_epochs", lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
     "an integer >= 1 (or -1: no limit)"),
)
_ABSENT = object()


def check_values(cfg: DictConfig) -> None:
    """One :class:`ConfigError` line for the first value of :data:`VALUE_RULES` that is out of
    range (keys a config does not have are skipped)."""
    for key, ok, what in VALUE_RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{key}={value!r} must be {what}")


# what a resumed run must share with the checkpoint it resumes (else the weights do not fit)
RESUME_KEYS = ("backbone", "datamodule.num_classes", "datamodule.task", "datamodule.in_chans")


def check_resume(ckpt_path: str, run_config: dict) -> None:
    """One line when ``ckpt_path`` is missing, is not a weights-only medrobust checkpoint, or
    was trained with another network than this run builds (names the differing keys)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True).get(
            "medrobust_config") or {}
    except Exception as err:  # noqa: BLE001 - pickled code, a truncated file, not a checkpoint
        raise ConfigError(f"ckpt_path={ckpt_path!r} cannot be loaded as weights only: "
                          f"{str(err).splitlines()[0][:200]}") from err
    if not stored:
        return  # a checkpoint from before configs were stored: nothing to compare
    now, then = OmegaConf.create(run_config), OmegaConf.create(upgrade_targets(stored))
    diffs = []
    for key in RESUME_KEYS:
        a, b = OmegaConf.select(then, key), OmegaConf.select(now, key)
        if isinstance(a, DictConfig) and isinstance(b, DictConfig):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise ConfigError(f"ckpt_path={ckpt_path!r} was trained with another network than this "
                          f"run builds ({'; '.join(diffs)}); resume with the same settings")
