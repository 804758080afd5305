"""Model selection: the criterion per defense, degenerate epochs, both checkpoints kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datamodules import from_config
from lightning_modules.training.selection import chance_level, eligibility
from tests import layouts
from tests.conftest import CONF, FAST, compose_cfg
from train import train

RULE = dict(OmegaConf.load(CONF / "module" / "default.yaml").eligibility)  # the configured rule


def test_chance_levels():
    assert chance_level("multiclass", 4) == 0.25
    assert chance_level("multiclass", 7) == pytest.approx(1 / 7)
    assert chance_level("multilabel", 14) == 0.5


def test_degenerate_epochs_are_not_eligible():
    # a model that predicts one class: balanced accuracy 1/K, every prediction the same class
    ok, why = eligibility("multiclass", 4, 0.25, torch.tensor([0, 0, 32, 0]), **RULE)
    assert not ok and "chance" in why
    # clearly above chance, but 97% of the predictions in one class
    ok, why = eligibility("multiclass", 4, 0.40, torch.tensor([1, 0, 97, 2]), **RULE)
    assert not ok and "97.0%" in why and "class 2" in why
    assert eligibility("multiclass", 4, 0.40, torch.tensor([20, 30, 40, 10]), **RULE)[0]
    assert not eligibility("multilabel", 5, 0.51, None, **RULE)[0]  # AUROC near 0.5
    assert eligibility("multilabel", 5, 0.70, None, **RULE)[0]


def _epochs(run: dict) -> list[dict]:
    rows = list(csv.DictReader((Path(run["output_dir"]) / "csv" / "metrics.csv").open()))
    return [r for r in rows if r.get("val/sel_clean")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection")
    common = [*FAST, "backbone.width=8", "trainer.max_epochs=4", "threat.eps=2/255",
              "trainer.limit_train_batches=null", "trainer.limit_val_batches=null",
              "datamodule.n_train=256", "datamodule.n_val=64", "datamodule.batch_size=32",
              "datamodule.signal_amplitude=0.15", "datamodule.colour_amplitude=0",
              "attack.steps=3", "threat.train_steps=2"]  # colour off: the data these were built on
    return {d: train(compose_cfg("train", [*common, f"defense={d}"], out / d))
            for d in ("none", "pgd_at")}


@pytest.mark.parametrize("defense, criterion", [("none", "clean"), ("pgd_at", "robust")])
def test_tested_checkpoint_follows_the_defense_criterion(runs, defense, criterion):
    run = runs[defense]
    sel = run["selection"]
    epochs = _epochs(run)
    assert sel["criterion"] == criterion and not sel["fallback"], epochs
    assert len(epochs) == 4
    for r in epochs:  # the selection scores are the clean and the robust score, or -1
        eligible = float(r["val/eligible"]) == 1.0
        assert float(r["val/sel_clean"]) == pytest.approx(
            float(r["val/bal_acc"]) if eligible else -1.0)
        assert float(r["val/sel_robust"]) == pytest.approx(
            float(r["val/adv_score"]) if eligible else -1.0)
    robust_so_far = np.maximum.accumulate([float(r["val/sel_robust"]) for r in epochs])
    assert [float(r["val/sel_robust_best"]) for r in epochs] == pytest.approx(robust_so_far)
    scores = [float(r[f"val/sel_{criterion}"]) for r in epochs]
    best_epoch = int(epochs[int(np.argmax(scores))]["epoch"])
    if defense == "none":  # built so that the two criteria disagree: the test can tell them apart
        robust = [float(r["val/sel_robust"]) for r in epochs]
        assert int(np.argmax(robust)) != int(np.argmax(scores)), epochs
    assert sel["epoch"] == best_epoch  # the epoch tested is the best by the criterion
    assert torch.load(sel["checkpoint"], weights_only=True)["epoch"] == best_epoch
    assert Path(sel["checkpoint"]).name.startswith(f"best-{criterion}-epoch{best_epoch:03d}")
    # both answers kept, named so a reader knows which is which
    ckpts = run["checkpoints"]
    assert Path(ckpts["best_clean"]).name.startswith("best-clean-")
    assert Path(ckpts["best_robust"]).name.startswith("best-robust-")
    assert Path(ckpts["last"]).name == "last.ckpt"
    saved = json.loads((Path(run["output_dir"]) / "metrics.json").read_text())
    assert saved["selection"]["epoch"] == best_epoch
    assert saved["chance"] == {"bal_acc": 0.25}


def test_no_eligible_epoch_tests_last_and_says_so(train_cfg, capsys):
    result = train(train_cfg("defense=none", "trainer.max_epochs=2", "print_summary=true",
                             "module.eligibility.min_above_chance=0.9"))
    sel = result["selection"]
    assert sel["fallback"] and Path(sel["checkpoint"]).name == "last.ckpt"
    assert sel["epoch"] == 1 and set(sel["ineligible_epochs"]) == {"0", "1"}
    assert "NO EPOCH WAS ELIGIBLE" in capsys.readouterr().out


def test_selection_override_and_bad_value(train_cfg):
    result = train(train_cfg("defense=pgd_at", "defense.selection=last"))
    assert result["selection"]["criterion"] == "last"
    assert Path(result["best_checkpoint"]).name == "last.ckpt"
    from lightning_modules.core.errors import ConfigError

    with pytest.raises(ConfigError, match="defense.selection"):
        train(train_cfg("defense.selection=best"))


def test_group_pattern_keeps_each_patient_in_one_split(tmp_path):
    root = layouts.write_pneumonia(tmp_path / "kermany", patients=30)
    cfg = compose_cfg("train", ["experiment=pneumonia_kermany", f"datamodule.data_dir={root}"],
                      tmp_path / "run")
    options = {k: v for k, v in cfg.datamodule.items() if k != "_target_"}
    dm = from_config("folder", **{**options, "num_workers": 0, "val_fraction": 0.3})
    patient = {}
    for split in ("train", "val", "test"):
        for path in dm.paths(split):
            name = Path(path).name
            pid = name.split("_")[0] if name.startswith("person") else name.rsplit("-", 1)[0]
            patient.setdefault(pid, set()).add(split)
    assert len(patient) > 20
    assert all(len(splits) == 1 for splits in patient.values()), \
        {p: s for p, s in patient.items() if len(s) > 1}
    assert {s for splits in patient.values() for s in splits} == {"train", "val", "test"}
    # the official test folder stays the test split
    assert all("/test/" in p for p in dm.paths("test"))
    with pytest.raises(ValueError, match="group_pattern"):
        from_config("folder", data_dir=str(root), group_pattern="person\\d+")  # no group
