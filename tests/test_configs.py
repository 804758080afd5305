"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from lightning_modules.attacks import Attack
from lightning_modules.defenses import Defense
from tests.conftest import CONF, compose_cfg
from train import build

GROUPS = ["datamodule", "backbone", "defense", "attack", "module", "trainer", "logger",
          "callbacks", "experiment", "debug", "paths", "hydra"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_exists():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def _extra(group: str, option: str, ham_dir) -> list[str]:
    extra = []
    if (group == "datamodule" and option == "ham10000") or (
            group == "experiment" and "ham10000" in option):
        extra.append(f"datamodule.data_dir={ham_dir}")
    if group == "experiment":
        extra.append("datamodule.num_workers=0")
    if group == "trainer" and option in ("gpu", "ddp") and not torch.cuda.is_available():
        # the GPU presets compose as written; only their device is swapped to build here
        extra += ["trainer.accelerator=cpu", "trainer.devices=1"]
    return extra


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in GROUPS for o in options(g) if g != "hydra"])
def test_option_composes_and_builds(group, option, tmp_path, ham_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [f"{group}={option}", *_extra(group, option, ham_dir)]
    if group != "trainer" and group != "experiment":
        overrides.append("trainer=cpu")
    cfg = compose_cfg("train", overrides, tmp_path)
    parts = build(cfg)
    assert parts["trainer"] is not None
    module = parts["module"]
    assert isinstance(module.defense, Defense) and isinstance(module.val_attack, Attack)
    dm = parts["datamodule"]
    x = torch.rand(2, dm.in_chans, 32, 32)
    assert module.net(x).shape == (2, dm.num_classes)
    if "wandb" in option or option == "many_loggers":
        import wandb

        wandb.finish()


def test_eval_config_composes(tmp_path):
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt"], tmp_path)
    for name in cfg.attacks:
        assert isinstance(instantiate(cfg.attacks[name]), Attack)
    assert len(cfg.eps_grid) >= 3 and cfg.eps_grid[0] == 0
