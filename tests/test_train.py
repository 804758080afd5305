"""train.py and evaluate.py end to end with a few batches."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluate import evaluate
from lightning_modules.utils import ConfigError
from tests.conftest import FAST, ROOT, compose_cfg
from train import train


def _assert_run_outputs(result: dict, task: str = "multiclass") -> None:
    out = Path(result["output_dir"])
    assert (out / "metrics.json").is_file() and (out / "config_resolved.yaml").is_file()
    assert Path(result["best_checkpoint"]).is_file()
    assert Path(result["last_checkpoint"]).is_file()
    keys = ["test/acc", "test/adv_acc", "test/adv_score"]
    keys += ["test/bal_acc", "test/f1_macro"] if task == "multiclass" else ["test/auroc"]
    for key in keys:
        assert 0.0 <= result["test"][key] <= 1.0, key
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == pytest.approx(result["test"])


DEFENSES = sorted(p.stem for p in (ROOT / "conf" / "defense").glob("*.yaml"))


@pytest.mark.parametrize("defense", DEFENSES)
def test_each_defense_trains(train_cfg, defense):
    result = train(train_cfg(f"defense={defense}", "module.eps_warmup_epochs=1"))
    _assert_run_outputs(result)
    assert result["defense"]["defense"] == defense
    csv_log = Path(result["output_dir"]) / "csv" / "metrics.csv"
    header = csv_log.read_text().splitlines()[0].split(",")
    assert "train/loss_epoch" in header and "val/adv_score" in header
    assert "train/acc" in header  # clean training accuracy is logged for every defense
    if defense != "none":
        assert "train/adv_acc" in header


@pytest.mark.parametrize("defense", DEFENSES)
def test_each_defense_trains_multilabel(train_cfg, defense):
    result = train(train_cfg("experiment=synthetic_multilabel", "datamodule.num_classes=3",
                             f"defense={defense}"))
    _assert_run_outputs(result, task="multilabel")
    assert result["defense"]["defense"] == defense


def test_bf16_mixed_runs(train_cfg):
    result = train(train_cfg("trainer.precision=bf16-mixed", "trainer.limit_train_batches=1",
                             "defense.attacks.pgd.steps=2", "attack.steps=2"))
    _assert_run_outputs(result)


def test_wandb_offline(train_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    try:
        result = train(train_cfg("logger=wandb", "defense=none"))
    finally:
        wandb.finish()
    assert list(Path(result["output_dir"]).glob("wandb/offline-run-*"))


def test_resume_from_last_checkpoint(train_cfg):
    first = train(train_cfg("defense=none"))
    last = first["last_checkpoint"]
    ck1 = torch.load(last, weights_only=True)
    assert ck1["epoch"] == 0 and ck1["global_step"] == 2  # limit_train_batches=2
    second = train(train_cfg("defense=none", "trainer.max_epochs=2", f"ckpt_path={last}"))
    ck2 = torch.load(second["last_checkpoint"], weights_only=True)
    # resumed: one more epoch of 2 steps on top of the first, not a fresh start
    assert ck2["global_step"] == 4


def test_evaluate_checkpoint(train_cfg, tmp_path):
    result = train(train_cfg("defense=pgd_at"))
    cfg = compose_cfg("eval", [f"ckpt_path={result['best_checkpoint']}", "eps_grid=[0,2/255,8/255]",
                               "attacks.pgd.steps=5", "limit_batches=1"], tmp_path / "ev")
    report = evaluate(cfg)
    out = Path(report["output_dir"])
    assert out == Path(result["best_checkpoint"]).parent.parent / "eval"
    for name in ("report.json", "report.csv", "accuracy_vs_eps.png", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 1 + 2 * 3  # clean + (fgsm, pgd) x 3 eps
    by = {(r["attack"], r["eps_str"]): r for r in rows}
    clean_acc = float(by[("clean", "0")]["acc"])
    for atk in ("fgsm", "pgd"):
        assert float(by[(atk, "0")]["acc"]) == pytest.approx(clean_acc)  # eps=0 is clean
        assert float(by[(atk, "8/255")]["acc"]) <= clean_acc + 1e-6
    assert float(by[("pgd", "8/255")]["acc"]) <= float(by[("pgd", "2/255")]["acc"]) + 0.05


@pytest.mark.parametrize("override, match", [
    ("threat.eps=-0.1", "eps"),
    ("defense.attacks.pgd.steps=0", "steps"),
    ("attack.steps=0", "steps"),
    ("backbone=timm", None),
    ("datamodule=ham10000", "data_dir"),
])
def test_bad_input_stops_at_startup(train_cfg, override, match):
    extra = ["backbone.name=resnet_does_not_exist"] if override == "backbone=timm" else []
    with pytest.raises(ConfigError, match=match or "resnet_does_not_exist"):
        train(train_cfg(override, *extra))


def test_unknown_checkpoint_path(train_cfg, tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path"):
        train(train_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    cfg = compose_cfg("eval", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "ev")
    with pytest.raises(ConfigError, match="nope.ckpt"):
        evaluate(cfg)


# ------------------------------------------------------------------- subprocess (the CLI itself)
def _run(args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


CLI_FAST = [o for o in FAST if not o.startswith("print_summary")] + ["backbone.width=8"]


@pytest.mark.slow
def test_cli_train_then_evaluate(tmp_path):
    proc = _run([str(ROOT / "train.py"), *CLI_FAST, f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "clean" in out and "PGD-10 @ 8/255" in out and "best checkpoint:" in out
    ckpt = next(tmp_path.glob("train/runs/*/checkpoints/last.ckpt"))
    proc = _run([str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}", "limit_batches=1",
                 "attacks.pgd.steps=3", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ckpt.parent.parent / "eval" / "report.json").is_file()


@pytest.mark.slow
def test_cli_bad_input_one_clear_message(tmp_path):
    proc = _run([str(ROOT / "train.py"), "threat.eps=-1/255", f"paths.log_dir={tmp_path}"],
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "medrobust: error:" in proc.stderr and "eps" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_ddp_sim(tmp_path):
    proc = _run([str(ROOT / "train.py"), *CLI_FAST, "trainer=ddp_sim",
                 "trainer.accelerator=cpu", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next(tmp_path.glob("train/runs/*/metrics.json")).read_text())
    assert "test/adv_acc" in metrics["test"]


@pytest.mark.slow
def test_cli_multirun(tmp_path):
    proc = _run([str(ROOT / "train.py"), "-m", *CLI_FAST, "defense=none,pgd_at",
                 f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(tmp_path.glob("train/multiruns/*/*/metrics.json"))
    assert len(files) == 2
    defenses = {json.loads(f.read_text())["defense"]["defense"] for f in files}
    assert defenses == {"none", "pgd_at"}


def test_channels_last_option(train_cfg):
    result = train(train_cfg("module.channels_last=true", "defense=pgd_at"))
    _assert_run_outputs(result)
