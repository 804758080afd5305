"""Datamodules: one per dataset layout, each configured once in ``conf/datamodule/``."""

from .config import datamodule_config, from_config

__all__ = ["datamodule_config", "from_config"]
