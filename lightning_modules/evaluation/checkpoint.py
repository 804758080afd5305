"""Checkpoints as ``evaluate.py`` reads them: loaded weights-only, their stored config built
only from this project's classes, the network rebuilt with its weights, and the threat model
the evaluation inherits from training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from lightning_modules.core.config import instantiate_node, upgrade_targets
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.threat import format_eps, parse_eps

__all__ = ["TRUSTED_TARGETS", "load_checkpoint", "check_targets", "stored_config",
           "build_network", "inherit_threat", "report_dir", "expand_checkpoints"]

# A checkpoint may come from a stranger: its stored config may only build our own classes (and
# an albumentations pipeline), never an arbitrary callable such as a file writer.
TRUSTED_TARGETS = ("datamodules.", "lightning_modules.", "albumentations.")


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a medrobust checkpoint (weights only, no pickled code) and check it."""
    if not path or path == "???":
        raise ConfigError("ckpt_path is not set: python evaluate.py ckpt_path=PATH")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"ckpt_path={str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot load checkpoint {p}: {err}") from err
    if "medrobust_config" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{p} is not a medrobust checkpoint (no stored training config)")
    return ckpt


def check_targets(node: Any, where: str) -> None:
    """Raise :class:`ConfigError` for any ``_target_`` under ``node`` outside
    :data:`TRUSTED_TARGETS`."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(TRUSTED_TARGETS):
            raise ConfigError(f"{where}._target_={target!r} in the checkpoint's stored config is "
                              f"not one of this project's classes {list(TRUSTED_TARGETS)}; "
                              "refusing to build it")
        for key, value in node.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def stored_config(ckpt: dict, datamodule_overrides: DictConfig | None,
                  complete: Callable[[DictConfig], DictConfig] | None = None) -> DictConfig:
    """The checkpoint's training config (trusted targets only), its datamodule completed by
    ``complete`` (today's defaults for options added since; ``datamodules.complete_stored_config``)
    and merged with ``datamodule_overrides`` (never the keys its weights fix)."""
    upgrade_targets(ckpt["medrobust_config"])  # checkpoints written before classes moved
    for key in ("datamodule", "backbone"):
        check_targets(ckpt["medrobust_config"].get(key), key)
    train_cfg = OmegaConf.create(ckpt["medrobust_config"])
    if complete is not None:
        train_cfg.datamodule = complete(train_cfg.datamodule)
    for key in ("num_classes", "task", "in_chans", "image_size"):  # fixed by the weights
        if datamodule_overrides and key in datamodule_overrides and \
                datamodule_overrides[key] != train_cfg.datamodule.get(key):
            raise ConfigError(f"+datamodule.{key}={datamodule_overrides[key]!r}: the checkpoint "
                              f"was trained with {key}={train_cfg.datamodule.get(key)!r}, which "
                              "its weights fix; evaluate it on data of that shape")
    if datamodule_overrides:
        train_cfg.datamodule = OmegaConf.merge(train_cfg.datamodule, datamodule_overrides)
    return train_cfg


def build_network(train_cfg: DictConfig, ckpt: dict) -> nn.Module:
    """The backbone of ``train_cfg`` with the checkpoint's weights, in eval mode (an evaluation
    network: BatchNorm uses and keeps its running statistics)."""
    net = instantiate_node(train_cfg, "backbone")
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"the checkpoint's weights do not fit the network its config builds: "
                          f"{str(err).splitlines()[0][:200]}") from err
    return net.eval()


def inherit_threat(cfg: DictConfig, train_cfg: DictConfig) -> dict[str, Any]:
    """Fill ``cfg.threat.norm`` / ``cfg.threat.eps`` left ``null`` from the checkpoint's
    training threat (eps only when the norm is the training one; under another norm the largest
    radius of its grid), and ``eps_grid: null`` from the norm's grid in ``cfg.eps_grids`` with
    ``threat.eps`` added. Returns what the report states: the evaluation threat, the training one,
    and where each key came from; a norm other than the training one is said there."""
    trained = OmegaConf.to_container(train_cfg.get("threat") or {}, resolve=True)
    threat = cfg.get("threat") or {}
    grids = cfg.get("eps_grids") or {}
    source = {}
    with open_dict(cfg):
        if cfg.get("threat") is None:
            cfg.threat = {}
        if threat.get("norm") is None:
            if trained.get("norm") is None:
                raise ConfigError("threat.norm is null and the checkpoint stores no training "
                                  "threat: set threat.norm")
            cfg.threat.norm, source["norm"] = trained["norm"], "checkpoint"
        else:
            source["norm"] = "config"
        norm = str(cfg.threat.norm)
        if norm not in grids:
            raise ConfigError(f"threat.norm={norm!r} must be one of {sorted(grids)} "
                              "(the norms of eps_grids)")
        default_grid = [parse_eps(e, f"eps_grids.{norm}") for e in grids[norm]]
        if threat.get("eps") is not None:
            source["eps"] = "config"
        elif norm == trained.get("norm") and trained.get("eps") is not None:
            cfg.threat.eps, source["eps"] = trained["eps"], "checkpoint"
        else:  # another norm than training: its radius means nothing here
            cfg.threat.eps, source["eps"] = max(default_grid), f"largest of eps_grids.{norm}"
        if cfg.get("eps_grid") is None:
            eps = parse_eps(cfg.threat.eps, "threat.eps")
            grid = default_grid if any(abs(eps - g) < 1e-9 for g in default_grid) \
                else sorted([*default_grid, eps])
            cfg.eps_grid = grid
            source["eps_grid"] = f"default for {norm}"
        else:
            source["eps_grid"] = "config"
    note = None
    if trained.get("norm") and str(cfg.threat.norm) != str(trained.get("norm")):
        note = (f"evaluated under {cfg.threat.norm} (threat.norm set), but the checkpoint was "
                f"trained under {trained['norm']} at eps {format_eps(parse_eps(trained['eps']))}")
    return {"norm": str(cfg.threat.norm), "eps": format_eps(parse_eps(cfg.threat.eps)),
            "trained": trained or None, "source": source, "note": note}


def report_dir(ckpt_path: str, output_dir: str | None) -> Path:
    """``output_dir``, or ``<run dir>/eval/<checkpoint name>/`` beside the checkpoints folder
    (one folder per checkpoint: nothing is overwritten)."""
    if output_dir:
        return Path(output_dir)
    ckpt_file = Path(ckpt_path).resolve()
    return ckpt_file.parent.parent / "eval" / ckpt_file.stem


def expand_checkpoints(value: Any) -> list[Path]:
    """``ckpt_path``: one file, a list of files, or a run/multirun folder (the checkpoint each
    finished run tested, from its ``metrics.json``)."""
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    out: list[Path] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            runs = sorted(p.rglob("metrics.json"))
            tested = [json.loads(m.read_text()).get("best_checkpoint") for m in runs]
            found = [Path(t) for t in tested if t]
            if not found:
                raise ConfigError(f"ckpt_path={str(p)!r} is a folder with no finished run "
                                  "(no metrics.json naming a tested checkpoint)")
            out += found
        else:
            out.append(p)
    if not out:
        raise ConfigError("ckpt_path is an empty list")
    return out
