"""Datamodules: one per dataset layout, each configured once in ``conf/datamodule/``."""

from .config import complete_stored_config, datamodule_config, from_config

__all__ = ["complete_stored_config", "datamodule_config", "from_config"]
