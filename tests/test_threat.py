"""The threat model a run records and an evaluation uses: ``conf/threat`` for training, the
checkpoint's training threat for ``evaluate.py`` unless told otherwise (and then said)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluate import evaluate
from tests.conftest import compose_cfg
from train import train

QUICK = ["evaluation=quick", "attacks.pgd.steps=2", "trainer.limit_test_batches=1",
         "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
    """A tiny run trained under L2 (eps 0.5), validated at another radius (attack.eps)."""
    from tests.conftest import FAST

    out = tmp_path_factory.mktemp("l2")
    cfg = compose_cfg("train", [*FAST, "backbone.width=8", "threat=l2", "threat.eps=0.5",
                                "attack.eps=0.25"], out / "run")
    return train(cfg)


def test_metrics_json_records_training_and_validation_threat(l2_run):
    saved = json.loads((Path(l2_run["output_dir"]) / "metrics.json").read_text())
    assert saved["threat"] == {"norm": "l2", "eps": 0.5, "eps_str": "0.5"}
    assert saved["val_threat"] == {"norm": "l2", "eps": 0.25, "eps_str": "0.25"}
    assert saved["val_attack"]["eps"] == pytest.approx(0.25)


def test_default_run_has_no_separate_validation_threat(train_cfg):
    result = train(train_cfg("defense=none"))
    assert result["threat"]["eps_str"] == "8/255" and result["val_threat"] is None


def test_evaluation_inherits_the_training_threat(l2_run, tmp_path):
    report = evaluate(compose_cfg("eval", [f"ckpt_path={l2_run['best_checkpoint']}", *QUICK,
                                           f"output_dir={tmp_path / 'a'}"], tmp_path))
    tm = report["threat_model"]
    assert tm["norm"] == ["l2"] and tm["note"] is None
    assert tm["eps_grid"] == ["0", "0.25", "0.5", "1"]  # conf/eval.yaml's L2 grid
    assert tm["source"] == {"norm": "checkpoint", "eps": "checkpoint",
                            "eps_grid": "default for l2"}
    assert {r["norm"] for r in report["results"]} == {"l2"}
    assert report["attacks"]["pgd"]["norm"] == "l2"


def test_another_norm_than_the_training_one_is_stated(l2_run, tmp_path):
    report = evaluate(compose_cfg("eval", [f"ckpt_path={l2_run['best_checkpoint']}", *QUICK,
                                           "threat.norm=linf", "eps_grid=[0,2/255]",
                                           f"output_dir={tmp_path / 'b'}"], tmp_path))
    note = report["threat_model"]["note"]
    assert note and "linf" in note and "trained under l2" in note
    assert report["threat_model"]["source"]["eps"] == "largest of eps_grids.linf"
    assert report["attacks"]["pgd"]["eps"] == pytest.approx(8 / 255)
    assert {r["norm"] for r in report["results"]} == {"linf"}
    assert note in (tmp_path / "b" / "report.md").read_text()


def test_training_eps_joins_the_default_grid(l2_run, tmp_path):
    report = evaluate(compose_cfg("eval", [f"ckpt_path={l2_run['best_checkpoint']}", *QUICK,
                                           "threat.eps=0.3", f"output_dir={tmp_path / 'c'}"],
                                  tmp_path))
    # threat.eps=0.3 given: it joins the L2 default grid, and the attacks are built at 0.3
    assert report["threat_model"]["eps_grid"] == ["0", "0.25", "0.3", "0.5", "1"]
    assert report["threat_model"]["source"]["eps"] == "config"
    assert report["attacks"]["pgd"]["eps"] == pytest.approx(0.3)


def test_checkpoint_written_before_the_backbones_moved_still_loads(l2_run, tmp_path):
    """Checkpoints store their config; those written before the restructuring name
    ``lightning_modules.backbones.*``: evaluation and resume read them as the new place."""
    import torch

    from lightning_modules.training.checks import check_resume

    ckpt = torch.load(l2_run["best_checkpoint"], map_location="cpu", weights_only=True)
    target = ckpt["medrobust_config"]["backbone"]["_target_"]
    assert target.startswith("lightning_modules.models.backbones.")
    ckpt["medrobust_config"]["backbone"]["_target_"] = target.replace(".models.", ".")
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    report = evaluate(compose_cfg("eval", [f"ckpt_path={old}", *QUICK, "eps_grid=[0]",
                                           f"output_dir={tmp_path / 'd'}"], tmp_path))
    assert report["backbone"] == target and report["n_images"] > 0
    new = torch.load(l2_run["best_checkpoint"], map_location="cpu", weights_only=True)
    check_resume(str(old), new["medrobust_config"])  # same network: no error
