"""wandb dashboards (``logger=wandb``, offline): the adversarial-examples table, curves per
epoch, runs grouped by sweep, runs always finished."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger

from lightning_modules.attacks import attack_from_config
from lightning_modules.core.tasks import Task
from lightning_modules.training.wandb_panels import (
    COLUMNS,
    AdversarialExamplesTable,
    adversarial_examples,
    group_runs_by_sweep,
)
from tests.conftest import CONF
from train import train

wandb = pytest.importorskip("wandb")
NAMES = ["a", "b", "c", "d"]
NAMES_SYNTHETIC = [f"stripes_{i * 45}deg" for i in range(4)]  # datamodule=synthetic


def test_rows_hold_images_in_unit_range_and_what_the_attack_did(trained_model):
    model, x, y = trained_model
    x, y, eps = x[:32], y[:32], 8 / 255
    rows = adversarial_examples(model, attack_from_config("pgd", eps=eps, steps=10), Task("multiclass"), x, y, NAMES)
    assert len(rows) == 32 and all(set(r) == set(COLUMNS) - {"epoch"} for r in rows)
    for i, r in enumerate(rows):
        for col in ("clean", "adversarial", "perturbation"):
            assert r[col].shape == (16, 16, 3) and r[col].dtype == np.float32
            assert 0.0 <= r[col].min() and r[col].max() <= 1.0, col
        np.testing.assert_allclose(r["clean"], x[i].permute(1, 2, 0).numpy(), atol=1e-6)
        assert np.abs(r["adversarial"] - r["clean"]).max() <= eps + 1e-6
        # amplified: mid-grey is no change, the largest change reaches black or white
        assert r["gain"] > 10 and np.abs(r["perturbation"] - 0.5).max() == pytest.approx(0.5)
        assert r["label"] == NAMES[int(y[i])] and {r["clean_pred"], r["adv_pred"]} <= set(NAMES)
    assert sum(r["clean_pred"] != r["adv_pred"] for r in rows) >= 2  # the attack did something


def test_multilabel_rows_name_the_findings():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    rows = adversarial_examples(net, attack_from_config("pgd", eps=4 / 255, steps=2), Task("multilabel"),
                                torch.rand(2, 3, 8, 8), y, ["x", "y", "z"])
    assert [r["label"] for r in rows] == ["x, z", "none"]


def test_offline_training_logs_the_table_and_the_curves(train_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tables, logged = [], []
    log_table, log_metrics = WandbLogger.log_table, WandbLogger.log_metrics

    def spy_table(self, key, columns=None, data=None, **kw):
        tables.append((key, columns, data))
        return log_table(self, key, columns=columns, data=data, **kw)

    def spy_metrics(self, metrics: dict, step=None):
        logged.append(dict(metrics))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_table", spy_table)
    monkeypatch.setattr(WandbLogger, "log_metrics", spy_metrics)
    try:
        result = train(train_cfg("logger=wandb", "defense=none", "trainer.max_epochs=2",
                                 "callbacks.wandb_examples.n_images=5"))
    finally:
        wandb.finish()
    # the first validation epoch and the end of training (epoch 1), each 5 images
    assert [(key, data[0][0]) for key, _, data in tables] == \
        [("examples/adversarial", 0), ("examples/adversarial", 1)]
    for _, columns, data in tables:
        assert columns == COLUMNS and len(data) == 5
        assert [row[1] for row in data] == [0, 8, 16, 23, 31]  # spread over the 32 val images
        for row in data:
            for cell in row[2:5]:
                assert isinstance(cell, wandb.Image)
                assert np.asarray(cell.image).dtype == np.uint8  # exact pixels of [0, 1] data
            assert row[6] in NAMES_SYNTHETIC and row[7] in NAMES_SYNTHETIC
    # clean and robust validation curves, one point per epoch
    epochs = sorted(m["epoch"] for m in logged if "val/acc" in m and "val/adv_acc" in m)
    assert epochs == [0, 1]
    # what reached the offline run: the table file with these columns
    (run,) = Path(result["output_dir"]).glob("wandb/offline-run-*")
    files = sorted(run.glob("files/media/table/examples/adversarial_*.table.json"))
    assert len(files) == 2
    assert json.loads(files[0].read_text())["columns"] == COLUMNS
    assert wandb.run is None



def test_a_sweep_groups_its_runs_by_the_sweep_folder(tmp_path):
    GlobalHydra.instance().clear()
    sweep = tmp_path / "multiruns" / "2026-01-02_03-04-05_000006"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", ["logger=many_loggers", f"hydra.sweep.dir={sweep}"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    try:
        group_runs_by_sweep(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert cfg.logger.wandb.group == sweep.name
    assert "group" not in cfg.logger.csv


def test_a_failed_fit_finishes_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")

    class Trainer:
        is_global_zero = True

    wandb.init(project="medrobust-test", dir=str(tmp_path))
    AdversarialExamplesTable(n_images=16, every_n_epochs=0, key="examples/adversarial").on_exception(Trainer(), None, RuntimeError("boom"))
    assert wandb.run is None
