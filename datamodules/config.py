"""Build a datamodule from its config: the one place its defaults live.

Every option's default is in ``conf/datamodule/`` (``base/loader.yaml``, ``base/files.yaml``,
then the dataset's own file); the datamodule classes take every option as a required argument.
For use outside ``train.py`` (notebooks, tests, benchmarks)::

    from datamodules import from_config
    dm = from_config("ham10000", data_dir="/data/ham10000", image_size=32)

The files are composed here as Hydra composes them (defaults lists of ``<file>@_here_``
entries, relative to the including file's folder, then ``_self_``), without Hydra's global
state, so this also works inside a running Hydra app (``evaluate.py``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.config import CONF_DIR, compose_file

__all__ = ["CONF_DIR", "datamodule_config", "from_config", "complete_stored_config"]

_GROUP = CONF_DIR / "datamodule"


def datamodule_config(name: str, **overrides: Any) -> DictConfig:
    """``conf/datamodule/<name>.yaml`` composed with its defaults, with ``overrides`` merged."""
    path = _GROUP / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in _GROUP.glob("*.yaml"))
        raise ValueError(f"datamodule={name!r} is not one of {options}")
    return OmegaConf.merge(compose_file(path), overrides)


def complete_stored_config(stored: DictConfig) -> DictConfig:
    """A datamodule config stored in a checkpoint, completed with today's defaults for options
    added since it was written (found by its ``_target_``); stored values win."""
    target = stored.get("_target_")
    for path in sorted(_GROUP.glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return OmegaConf.merge(compose_file(path), stored)
    return stored


def from_config(name: str, **overrides: Any):
    """The datamodule of ``conf/datamodule/<name>.yaml``, with ``overrides`` (e.g. ``data_dir``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(datamodule_config(name, **overrides), _convert_="all")
    except InstantiationException as err:  # re-raise what the datamodule itself raised
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None
