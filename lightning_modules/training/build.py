"""Everything a training run is made of, instantiated from its config: datamodule, network
(with the start-up check of the image size), defense, validation attack, LightningModule,
callbacks, loggers and trainer. Bad input is one :class:`ConfigError` line here, before any
training starts."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.core.config import instantiate_dict, instantiate_node
from lightning_modules.core.errors import ConfigError
from lightning_modules.models.backbones import check_input_size
from lightning_modules.training import resume
from lightning_modules.training.averaging import KINDS
from lightning_modules.training.checks import THREAT_KEYS, check_values
from lightning_modules.training.selection import CRITERIA

__all__ = ["build", "build_defense", "fill_from_data"]

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, callbacks, loggers and trainer from ``cfg``.

    Every piece of bad input (missing data, unknown backbone, eps < 0, ...) raises
    :class:`ConfigError` here, before any training starts.
    """
    check_values(cfg)  # also here: build() is called on its own (tests, tools)
    unknown = sorted(set(cfg.get("threat") or {}) - THREAT_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) threat.{unknown[0]} (of {unknown}); the threat model "
                          f"has {sorted(THREAT_KEYS)}")
    datamodule = instantiate_node(cfg, "datamodule")
    fill_from_data(cfg, datamodule)
    net = instantiate_node(cfg, "backbone")
    size, chans = cfg.datamodule.get("image_size"), getattr(datamodule, "in_chans", None)
    if size and chans:
        try:
            check_input_size(net, int(chans), int(size))
        except ValueError as err:
            raise ConfigError(f"backbone ({cfg.backbone.get('_target_')}"
                              f"{', ' + str(cfg.backbone.name) if 'name' in cfg.backbone else ''})"
                              f": {err}") from err
    defense, selection = build_defense(cfg)
    datamodule.train_index = bool(getattr(defense, "needs_index", False))
    task = cfg.datamodule.get("task")
    if task is not None and task not in defense.tasks:
        raise ConfigError(f"defense={defense.name} trains {'/'.join(defense.tasks)} tasks only, "
                          f"this one is datamodule.task={task}")
    val_attack = instantiate_node(cfg, "attack")
    module = instantiate_node(
        cfg, "module", net=net, defense=defense, val_attack=val_attack,
        class_names=list(getattr(datamodule, "class_names", []) or []) or None,
        class_weights=class_weights(cfg, datamodule),
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    try:  # a typo in module.optimizer or module.scheduler: one line now, not deep in fit
        module.configure_optimizers()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"module.optimizer / module.scheduler: {type(err).__name__}: "
                          f"{err}") from err
    averaging = cfg.defense.get("averaging", "none")
    if averaging not in ("none", None, *KINDS):
        raise ConfigError(f"defense.averaging={averaging!r} must be one of "
                          f"{['none', *KINDS]}")
    callbacks = instantiate_dict(cfg, "callbacks",
                                 skip=("weight_averaging",) if averaging in ("none", None) else ())
    loggers = instantiate_dict(cfg, "logger")
    # checkpoints written atomically (temporary file, fsync, rename), unless plugins are set
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [resume.AtomicCheckpointIO()]}
    trainer = instantiate_node(cfg, "trainer", callbacks=callbacks, logger=loggers or False,
                               **plugins)
    if trainer.test_loop.inference_mode or trainer.validate_loop.inference_mode:
        raise ConfigError("trainer.inference_mode must be false: adversarial validation and "
                          "test need gradients")
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "loggers": loggers,
            "selection": selection}


def build_defense(cfg: DictConfig):
    """The defense and its checkpoint ``selection`` criterion (a key of the defense config)."""
    selection = cfg.defense.get("selection")  # conf/defense/base/defaults.yaml
    if selection not in CRITERIA:
        raise ConfigError(f"defense.selection={selection!r} must be one of {list(CRITERIA)}")
    return instantiate_node(cfg, "defense", drop=("selection", "averaging")), selection


def fill_from_data(cfg: DictConfig, datamodule) -> None:
    """Write ``num_classes``, ``in_chans`` and ``task`` found in the data into ``cfg.datamodule``
    where the config leaves them ``null`` (folder/CSV/MedMNIST), so the backbone and module,
    which interpolate them, and the saved config get the real values."""
    with open_dict(cfg):
        for key in ("num_classes", "in_chans", "task"):
            if cfg.datamodule.get(key) is None and getattr(datamodule, key, None) is not None:
                cfg.datamodule[key] = getattr(datamodule, key)


def class_weights(cfg: DictConfig, datamodule) -> list[float] | None:
    """``module.class_weights``: ``null``, ``balanced`` (from the training labels) or a list."""
    weights = datamodule.class_weights(cfg.module.get("class_weights"))
    if weights is not None and cfg.module.get("class_weights") == "balanced":
        log.info("class weights (balanced): %s", [round(w, 3) for w in weights])
    return weights
