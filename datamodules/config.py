"""Build a datamodule from its config: the one place its defaults live.

Every option's default is in ``conf/datamodule/`` (``base/loader.yaml``, ``base/files.yaml``,
then the dataset's own file); the datamodule classes take every option as a required argument.
For use outside ``train.py`` (notebooks, tests, benchmarks)::

    from datamodules import from_config
    dm = from_config("ham10000", data_dir="/data/ham10000", image_size=32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONF_DIR", "datamodule_config", "from_config"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def datamodule_config(name: str, **overrides: Any) -> DictConfig:
    """``conf/datamodule/<name>.yaml`` composed with its defaults, with ``overrides`` merged."""
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / "datamodule" / f"{name}.yaml").is_file():
        options = sorted(p.stem for p in (CONF_DIR / "datamodule").glob("*.yaml"))
        raise ValueError(f"datamodule={name!r} is not one of {options}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"datamodule={name}"])
    node = cfg.datamodule
    OmegaConf.set_struct(node, False)
    return OmegaConf.merge(node, overrides)


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
