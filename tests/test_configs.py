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


def _dataset_fixture(option: str, root) -> list[str]:
    """Overrides that point the ``option`` datamodule at a tiny fixture in its layout."""
    from tests import layouts

    small = ["datamodule.val_fraction=0.2", "datamodule.test_fraction=0.2"]
    if option == "isic2018":
        return [f"datamodule.data_dir={layouts.write_isic2018(root / option)}", *small]
    if option == "isic2019":
        return [f"datamodule.data_dir={layouts.write_isic2019(root / option)}", *small]
    if option == "chestxray14":
        return [f"datamodule.data_dir={layouts.write_chestxray14(root / option)}", *small]
    if option == "medmnist":
        layouts.write_medmnist(root / option, "pathmnist")
        return [f"datamodule.data_dir={root / option}", "datamodule.flag=pathmnist"]
    if option == "folder":
        return [f"datamodule.data_dir={layouts.write_folder(root / option)}", *small]
    if option == "csv":
        return [f"datamodule.data_dir={layouts.write_csv_dataset(root / option)}",
                "datamodule.csv_file=labels.csv", "datamodule.label_column=diagnosis", *small]
    return []


def _extra(group: str, option: str, ham_dir) -> list[str]:
    extra = []
    if (group == "datamodule" and option == "ham10000") or (
            group == "experiment" and "ham10000" in option):
        extra.append(f"datamodule.data_dir={ham_dir}")
    elif group == "datamodule":
        extra += _dataset_fixture(option, ham_dir.parent)
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
