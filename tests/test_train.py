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
from lightning_modules.core.errors import ConfigError
from tests.conftest import FAST, ROOT, compose_cfg
from train import train


def _assert_run_outputs(result: dict, task: str = "multiclass", eps: float = 8 / 255) -> None:
    out = Path(result["output_dir"])
    assert (out / "metrics.json").is_file() and (out / "config_resolved.yaml").is_file()
    assert Path(result["best_checkpoint"]).is_file()
    assert Path(result["last_checkpoint"]).is_file()
    keys = ["test/acc", "test/adv_acc", "test/adv_score"]
    keys += ["test/bal_acc", "test/f1_macro"] if task == "multiclass" else ["test/auroc"]
    for key in keys:
        assert 0.0 <= result["test"][key] <= 1.0, key
    score = "bal_acc" if task == "multiclass" else "auroc"
    assert result["test"]["test/adv_score"] == result["test"][f"test/adv_{score}"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == pytest.approx(result["test"])
    # the threat model the run reports is the one configured
    assert saved["threat"]["eps"] == pytest.approx(eps)
    assert saved["val_attack"]["eps"] == pytest.approx(eps)
    assert saved["val_attack"]["norm"] == saved["threat"]["norm"]


DEFENSES = sorted(p.stem for p in (ROOT / "conf" / "defense").glob("*.yaml"))


@pytest.mark.parametrize("defense", DEFENSES)
def test_each_defense_trains(train_cfg, defense):
    # MPAdvT as released draws clean batches half the time: make both batches adversarial
    extra = ["defense.p_adv=1.0"] if defense == "mpadvt_released" else []
    if defense == "smoothadv":  # the smoothed classifier is attacked in L2
        extra += ["threat=l2"]
    result = train(train_cfg(f"defense={defense}", "module.eps_warmup_epochs=1", *extra))
    _assert_run_outputs(result, eps=0.5 if defense == "smoothadv" else 8 / 255)
    assert result["defense"]["defense"] == defense
    csv_log = Path(result["output_dir"]) / "csv" / "metrics.csv"
    header = csv_log.read_text().splitlines()[0].split(",")
    assert "train/loss_epoch" in header and "val/adv_score" in header
    assert "train/acc" in header  # clean training accuracy is logged for every defense
    if defense != "none":
        assert "train/adv_acc" in header


SINGLE_LABEL_DEFENSES = ("gaussian", "smoothadv")  # randomized smoothing certifies an argmax


@pytest.mark.parametrize("defense", DEFENSES)
def test_each_defense_trains_multilabel(train_cfg, defense):
    cfg = train_cfg("experiment=synthetic_multilabel", "datamodule.num_classes=3",
                    f"defense={defense}", *(["threat=l2"] if defense == "smoothadv" else []))
    if defense in SINGLE_LABEL_DEFENSES:  # refused at start-up, in one line
        with pytest.raises(ConfigError, match=f"defense={defense} trains multiclass tasks only"):
            train(cfg)
        return
    result = train(cfg)
    _assert_run_outputs(result, task="multilabel")
    assert result["defense"]["defense"] == defense


def test_bf16_mixed_runs(train_cfg, trained_model):
    """A bf16-mixed run trains and tests, and its attack still works under bf16 autocast: it
    raised the test loss of the run; with a trained undefended net (16 px) in the same module
    and trainer (PGD-5) it lowers the accuracy clearly, at an L-inf distance of eps."""
    import copy

    from lightning_modules.training.build import build

    bf16 = ("trainer.precision=bf16-mixed", "trainer.limit_train_batches=1",
            "defense.attacks.pgd.steps=2", "attack.steps=2")
    result = train(train_cfg(*bf16))
    _assert_run_outputs(result)
    assert result["test"]["test/adv_loss"] > result["test"]["test/loss"]
    model, x, y = trained_model
    parts = build(train_cfg(*bf16, "attack.steps=5", "datamodule.signal_amplitude=0.15",
                            "callbacks=none", "~logger", "+trainer.enable_checkpointing=false"))
    assert parts["trainer"].precision == "bf16-mixed"
    module = parts["module"]
    module.net = copy.deepcopy(model)
    (tested,) = parts["trainer"].test(module, datamodule=parts["datamodule"], verbose=False)
    assert tested["test/acc"] >= 0.75, tested
    assert tested["test/adv_acc"] <= tested["test/acc"] - 0.15, tested  # 1.0 -> 0.75 here
    x, y = x[:8], y[:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = module.val_attack(model, x, y)
    eps = module.val_attack.eps
    assert x_adv.dtype == torch.float32 and eps == pytest.approx(8 / 255)
    delta = (x_adv - x).abs()
    assert delta.max() <= eps + 1e-6 and (delta >= 0.9 * eps).float().mean() > 0.5


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
    # another network than the checkpoint's: one line naming the key, before any training
    with pytest.raises(ConfigError, match=r"backbone.width: 8 -> 16"):
        train(train_cfg("defense=none", "backbone.width=16", f"ckpt_path={last}"))
    # a pickle payload (code, not weights) is refused with one line, and not run
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    bad = Path(last).parent / "payload.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ConfigError, match="cannot be loaded as weights only"):
        train(train_cfg("defense=none", f"ckpt_path={bad}"))


@pytest.fixture(scope="module")
def undefended_run(tmp_path_factory):
    """``defense=none`` trained long enough on the embedded data to be well above chance."""
    out = tmp_path_factory.mktemp("undefended")
    cfg = compose_cfg("train", [*FAST, "backbone.width=8", "defense=none",
                                "trainer.max_epochs=4", "trainer.limit_train_batches=null",
                                "trainer.limit_test_batches=null", "datamodule.n_train=512",
                                "datamodule.n_test=96", "datamodule.signal_amplitude=0.15",
                                "datamodule.batch_size=32"], out / "run")
    return train(cfg)


def test_evaluate_standard_preset_cascades(undefended_run, tmp_path):
    """The default preset: PGD at every radius, the fast attack at the threat radius on the
    images PGD did not fool, the worst case, the cost (seconds, passes) of each, and the attack
    probes among the honesty checks."""
    report = evaluate(compose_cfg("eval", [
        f"ckpt_path={undefended_run['best_checkpoint']}", "eps_grid=[0,2/255,8/255]",
        "subset=32", "attacks.pgd.steps=5", "attacks.fast.ce_iters=5",
        "attacks.fast.targeted_iters=5", "attacks.fast.square_queries=20",
        f"output_dir={tmp_path / 'std'}"], tmp_path))
    assert report["evaluation"] == "standard" and report["cascade"] is True
    # (PGD-5 and a fast attack of 5 iterations may not converge: then the stronger PGD of
    # more_steps_never_help joins at 8/255; test_evaluate_escalates_when_more_steps_help)
    escalated = {"pgd_strong", "pgd_strong_cw"} & set(report["attacks"])
    assert set(report["attacks"]) - escalated == {"pgd", "fast"}
    assert not report["skipped_attacks"]
    row = {(r["attack"], r["eps_str"]): r for r in report["results"] if r["attack"] not in
           escalated}
    cost = report["cost"]["per_attack"]
    n, clean = report["n_images"], report["clean"]["acc"]
    # the fast attack runs at the threat radius (8/255) only; PGD at every radius
    assert set(row) == {("pgd", "0"), ("pgd", "2/255"), ("pgd", "8/255"), ("fast", "8/255"),
                        ("worst", "8/255")}
    assert cost["pgd@0"]["images_attacked"] == 0 and n == 32
    # at 8/255 PGD attacks the images right clean, the fast attack those PGD left right
    pgd, fast = row[("pgd", "8/255")], row[("fast", "8/255")]
    assert cost["pgd@8/255"]["images_attacked"] == round(clean * n)
    assert cost["fast@8/255"]["images_attacked"] == round(pgd["acc"] * n)
    assert fast["acc"] <= pgd["acc"]
    assert fast["acc"] == pytest.approx(row[("worst", "8/255")]["acc"]) or escalated
    # passes counted on the model: PGD-5 = 5 forward + 5 backward + 1 forward per image
    assert cost["pgd@8/255"]["forward_passes"] == 6 * round(clean * n) or \
        cost["pgd@8/255"]["forward_passes"] < 6 * round(clean * n)  # early stop
    assert report["cost"]["forward_passes"] > report["cost"]["backward_passes"] > 0
    names = {c["check"] for c in report["checks"]}
    assert {"large_eps_breaks_the_model", "more_steps_never_help", "square_not_above_white_box",
            "pgd_and_fast_agree", "attacks_stay_in_threat_model"} <= names
    summary = (tmp_path / "std" / "report.md").read_text()
    assert "Cascade" in summary and "backward image passes" in summary


def test_evaluate_escalates_when_more_steps_help(undefended_run, tmp_path):
    """A one-step PGD labelled PGD-20 trips more_steps_never_help before the evaluation: the
    check fails, says the number is an upper bound, and the stronger PGD joins the evaluation
    at the threat radius, inside the worst case."""
    report = evaluate(compose_cfg("eval", [
        f"ckpt_path={undefended_run['best_checkpoint']}", "evaluation=quick",
        "evaluation.probes=true", "eps_grid=[0,8/255]", "subset=32",
        "attacks.pgd.steps=1", "attacks.pgd.random_start=false", "attacks.pgd.step_size=1e-4",
        f"output_dir={tmp_path / 'esc'}"], tmp_path))
    check = next(c for c in report["checks"] if c["check"] == "more_steps_never_help")
    assert not check["passed"] and "upper bound" in check["detail"], check
    row = {(r["attack"], r["eps_str"]): r for r in report["results"]}
    assert {("pgd_strong", "8/255"), ("pgd_strong_cw", "8/255"), ("worst", "8/255")} <= set(row)
    assert row[("worst", "8/255")]["acc"] < row[("pgd", "8/255")]["acc"]
    assert (tmp_path / "esc" / "preflight.json").is_file()


def test_evaluate_gap_fits_saves_and_reuses_its_generator(undefended_run, tmp_path):
    args = [f"ckpt_path={undefended_run['best_checkpoint']}", "evaluation=quick",
            "+attack@attacks.gap=gap", "attacks.gap.width=4", "attacks.gap.blocks=1",
            "attacks.gap.epochs=1", "attacks.gap.max_batches=2", "eps_grid=[0,8/255]",
            "attacks.pgd.steps=2", f"output_dir={tmp_path / 'g'}"]
    first = evaluate(compose_cfg("eval", args, tmp_path / "a"))
    info = first["gap"]["gap"]
    assert info["reused"] is False and info["fit_seconds"] > 0 and Path(info["path"]).is_file()
    assert Path(info["path"]).parent == tmp_path / "g"  # beside the report
    second = evaluate(compose_cfg("eval", args, tmp_path / "b"))
    assert second["gap"]["gap"]["reused"] is True and second["gap"]["gap"]["path"] == info["path"]
    rows = [{(r["attack"], r["eps_str"]): r["acc"] for r in rep["results"]}
            for rep in (first, second)]
    assert rows[0][("gap", "8/255")] == rows[1][("gap", "8/255")]  # the same generator
    assert rows[0][("gap", "0")] == first["clean"]["acc"]
    # its cost: one forward pass per image, beside PGD's
    assert first["cost"]["per_attack"]["gap@8/255"]["images_attacked"] == first["n_images"]
    assert first["cost"]["per_attack"]["gap@0"]["images_attacked"] == 0
    # a path that holds no generator of these settings is one clear line
    with pytest.raises(ConfigError, match="attacks.gap.path"):
        evaluate(compose_cfg("eval", [*args, f"attacks.gap.path={tmp_path / 'none.pt'}"],
                             tmp_path / "c"))


def test_evaluate_several_checkpoints_gives_one_comparison(undefended_run, tmp_path):
    from evaluate import evaluate_many

    best, last = undefended_run["best_checkpoint"], undefended_run["last_checkpoint"]
    base = ["evaluation=quick", "attacks.pgd.steps=2", "eps_grid=[0,8/255]",
            "trainer.limit_test_batches=1"]
    many = evaluate_many(compose_cfg("eval", [f"ckpt_path=[{best},{last}]", *base,
                                              f"output_dir={tmp_path / 'cmp'}"], tmp_path))
    assert [r["checkpoint"] for r in many["reports"]] == [best, last]
    dirs = {r["output_dir"] for r in many["reports"]}
    assert len(dirs) == 2  # each report in a folder of its own
    for name in ("comparison.csv", "comparison.md", "comparison.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    assert len(rows) == 2 and "robust_bal_acc@8/255" in rows[0]
    assert float(rows[0]["clean_acc"]) == many["reports"][0]["clean"]["acc"]
    # with the corruption benchmark: mCE of each against checkpoint 0 (itself: exactly 1)
    cor = evaluate_many(compose_cfg("eval", [
        f"ckpt_path=[{best},{last}]", *base, "+corruptions@evaluation.corruptions=medmnist_c",
        "evaluation.corruptions.images=6", "evaluation.corruptions.severities=[1,5]",
        "evaluation.corruptions.sequences=[rotate]", "evaluation.corruptions.frames=3",
        f"output_dir={tmp_path / 'cmp_c'}"], tmp_path))
    first = cor["comparison"][0]
    assert first["mce_vs"] == "checkpoint 0" and first["mCE"] == pytest.approx(1.0)
    assert 0 <= first["corrupt_bal_acc"] <= 1 and 0 <= first["flip_prob"] <= 1
    text = (tmp_path / "cmp_c" / "comparison.md").read_text()
    assert "## Common corruptions" in text and "| gaussian_noise |" in text
    # a run folder: the checkpoint its metrics.json says was tested
    run_dir = Path(undefended_run["output_dir"])
    folder = evaluate_many(compose_cfg("eval", [f"ckpt_path={run_dir}", *base], tmp_path / "f"))
    assert [r["checkpoint"] for r in folder["reports"]] == [best]
    assert (tmp_path / "f" / "comparison.md").is_file()
    with pytest.raises(ConfigError, match="no finished run"):
        evaluate_many(compose_cfg("eval", [f"ckpt_path={tmp_path / 'cmp'}", *base], tmp_path))


def test_evaluate_report_to_wandb_offline(undefended_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    out = tmp_path / "wb"
    try:
        evaluate(compose_cfg("eval", [f"ckpt_path={undefended_run['best_checkpoint']}",
                                      "evaluation=corruptions", "attacks.pgd.steps=2",
                                      "eps_grid=[0,8/255]", "trainer.limit_test_batches=1",
                                      "evaluation.corruptions.images=6",
                                      "evaluation.corruptions.severities=[1,5]",
                                      "evaluation.corruptions.sequences=[]",
                                      "logger=wandb", f"output_dir={out}"], tmp_path))
    finally:
        wandb.finish()
    runs = list(out.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    table = json.loads(next(media.glob("table/eval/results_*.table.json")).read_text())
    rows = {(r[0], r[2]): dict(zip(table["columns"], r, strict=True)) for r in table["data"]}
    assert set(rows) == {("clean", "0"), ("pgd", "0"), ("pgd", "8/255")}
    assert rows[("pgd", "0")]["acc"] == rows[("clean", "0")]["acc"]
    assert list(media.glob("table/eval/checks_*.table.json"))
    assert list(media.glob("images/eval/metric_vs_eps_*.png"))
    cor = json.loads(next(media.glob("table/eval/corruptions/table_*.table.json")).read_text())
    assert cor["columns"] == ["corruption", "severity 1", "severity 5", "mean", "drop"]
    assert len(cor["data"]) == 15  # the dermoscopy set, for the synthetic data
    assert list(media.glob("images/eval/corruptions/corruption_examples_*.png"))


def test_killed_evaluation_resumes_from_its_saved_batches(undefended_run, tmp_path,
                                                          monkeypatch):
    from lightning_modules.evaluation.engine import RobustEvaluator

    args = [f"ckpt_path={undefended_run['best_checkpoint']}", "evaluation=quick", "~attacks.pgd",
            "+attack@attacks.fgsm=fgsm", "eps_grid=[0,8/255]",  # FGSM: deterministic
            "+datamodule.eval_batch_size=32", f"output_dir={tmp_path / 'r'}"]
    fresh = evaluate(compose_cfg("eval", [*args[:-1], f"output_dir={tmp_path / 'f'}"], tmp_path))
    assert fresh["resumed_batches"] == 0 and not (tmp_path / "f" / "partial").exists()
    real, calls = RobustEvaluator.attack_batch, []

    def dies_on_third_batch(self, model, x, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self, model, x, y)

    monkeypatch.setattr(RobustEvaluator, "attack_batch", dies_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(compose_cfg("eval", args, tmp_path))
    assert len(list((tmp_path / "r" / "partial").glob("rank0-batch*.pt"))) == 2
    monkeypatch.setattr(RobustEvaluator, "attack_batch", real)
    resumed = evaluate(compose_cfg("eval", args, tmp_path))
    assert resumed["resumed_batches"] == 2 and resumed["n_images"] == fresh["n_images"] == 96
    assert resumed["clean"] == fresh["clean"]
    assert [r["acc"] for r in resumed["results"]] == [r["acc"] for r in fresh["results"]]
    assert not (tmp_path / "r" / "partial").exists()  # removed once the report is written


@pytest.mark.parametrize("multilabel", [False, True])
def test_evaluate_xu2021_preset_writes_the_analyses(undefended_run, train_cfg, tmp_path,
                                                    multilabel):
    ckpt = undefended_run["best_checkpoint"]
    if multilabel:
        ckpt = train(train_cfg("experiment=synthetic_multilabel", "datamodule.num_classes=3",
                               "defense=none"))["best_checkpoint"]
    report = evaluate(compose_cfg("eval", [
        f"ckpt_path={ckpt}", "evaluation=xu2021", "eps_grid=[0,8/255]", "attacks.pgd.steps=3",
        "attacks.gap.epochs=1", "attacks.gap.max_batches=2", "attacks.gap.width=4",
        "evaluation.analysis_images=40", "evaluation.probes=false",
        "evaluation.corruptions.images=12", "evaluation.corruptions.frames=3",
        f"output_dir={tmp_path / 'xu'}"], tmp_path))
    ana = report["analyses"]
    assert ana["attacks"] == ["pgd", "gap"] and ana["eps"] == "8/255"
    assert ana["n_images"] == min(40, report["n_images"])
    assert not [c for c in report["checks"] if not c["passed"]], report["checks"]
    assert list(ana["feature_distance"]["pgd"]) == ["block1", "block2", "block3", "pooled"]
    assert all(v > 0 for d in ana["feature_distance"].values() for v in d.values())
    assert set(ana["discriminability"]) == {"clean", "pgd", "gap"}
    for name in ana["files"].values():
        assert (tmp_path / "xu" / "analyses" / name).stat().st_size > 0, name
    if multilabel:
        corr = ana["label_correlation"]
        assert set(corr["distance_to_truth"]) == {"clean", "pgd", "gap"}
        assert len(corr["cooccurrence"]["truth"]) == 3
    else:
        conf = ana["confusion"]
        assert sum(map(sum, conf["clean"])) == ana["n_images"] and len(conf["pgd"]) == 4
        assert "examples" in ana["files"]
    summary = (tmp_path / "xu" / "report.md").read_text()
    assert "## Analyses" in summary and "analyses/tsne.png" in summary
    cor = report["corruptions"]  # the common-perturbation benchmark, on the synthetic images
    assert cor["set"] == "dermoscopy" and cor["n_images"] == 12 and len(cor["table"]) == 15
    assert set(cor["flip_probability"]["kinds"]) == {"gaussian_noise", "gaussian_blur",
                                                     "brightness", "rotate", "translate", "scale"}
    assert all(0 <= v <= 1 for v in cor["flip_probability"]["kinds"].values())
    for name in cor["files"].values():
        assert (tmp_path / "xu" / "corruptions" / name).stat().st_size > 0, name
    assert "## Common corruptions" in summary


def test_evaluate_full_preset_on_multilabel_skips_single_label_attacks(train_cfg, tmp_path):
    run = train(train_cfg("experiment=synthetic_multilabel", "datamodule.num_classes=3",
                          "defense=none"))
    report = evaluate(compose_cfg("eval", [
        f"ckpt_path={run['best_checkpoint']}", "evaluation=full", "eps_grid=[0,8/255]",
        *[f"attacks.{a}.steps=2" for a in ("pgd", "pgd_hide", "pgd_add")],
        "attacks.gap.epochs=1", "attacks.gap.max_batches=1", "attacks.gap.width=4",
        "evaluation.corruptions.images=8", "evaluation.corruptions.sequences=[]",
        "trainer.limit_test_batches=1", f"output_dir={tmp_path / 'full'}"], tmp_path))
    assert report["task"] == "multilabel" and report["cascade"] is False
    assert set(report["skipped_attacks"]) == {"pgd_cw", "pgd_t", "fast", "aa"}
    assert set(report["attacks"]) == {"fgsm", "pgd", "pgd_hide", "pgd_add", "gap"}
    rows = {(r["attack"], r["eps_str"]): r for r in report["results"]}
    for name in ("fgsm", "pgd", "pgd_hide", "pgd_add", "gap", "worst"):  # changed sets
        assert 0 <= rows[(name, "8/255")]["fooling_rate"] <= 1
    assert rows[("pgd", "0")]["fooling_rate"] == 0
    assert "**skipped** `aa`" in (tmp_path / "full" / "report.md").read_text()
    cor = report["corruptions"]  # multi-label: scored by macro AUROC
    assert cor["score_metric"] == "auroc" and cor["flip_probability"] is None


def test_undefended_model_is_less_accurate_under_attack(undefended_run):
    test = undefended_run["test"]
    assert test["test/acc"] > 0.6, "the undefended model did not learn; the check means nothing"
    assert test["test/adv_acc"] < test["test/acc"] - 0.1  # the validation attack really bites
    assert test["test/adv_bal_acc"] < test["test/bal_acc"]


# the quick preset (PGD-20) plus FGSM: cheap, and two attacks give a worst case
QUICK_FGSM = ["evaluation=quick", "+attack@attacks.fgsm=fgsm"]


def test_evaluate_checkpoint(undefended_run, tmp_path):
    ckpt = undefended_run["best_checkpoint"]
    cfg = compose_cfg("eval", [f"ckpt_path={ckpt}", "eps_grid=[0,2/255,8/255]", *QUICK_FGSM,
                               "attacks.pgd.steps=5"], tmp_path / "ev")
    report = evaluate(cfg)
    out = Path(report["output_dir"])
    assert out == Path(ckpt).parent.parent / "eval" / Path(ckpt).stem  # one folder per ckpt
    for name in ("report.json", "report.csv", "accuracy_vs_eps.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert report["n_images"] == 96
    # report.json follows the typed schema and reads back
    from lightning_modules.evaluation.schema import EvalReport

    back = EvalReport.load(out / "report.json")
    assert back.as_dict() == json.loads((out / "report.json").read_text())
    assert back.software["torch"] and back.software["lightning"] and back.software["python"]
    assert back.threat_model == {"norm": ["linf"], "eps_grid": ["0", "2/255", "8/255"],
                                 "source": {"norm": "checkpoint", "eps": "checkpoint",
                                            "eps_grid": "config"}, "note": None}
    assert {r.attack for r in back.results} == {"fgsm", "pgd", "worst"}
    with pytest.raises(ValueError, match="missing"):
        EvalReport.from_dict({"results": []})
    # an honest model passes every honesty check, and the report and summary say so
    checks = {c["check"]: c["passed"] for c in report["checks"]}
    assert set(checks) == {"attacks_stay_in_threat_model", "monotone_in_eps",
                           "outputs_are_logits", "worst_case_not_above_attacks",
                           "deterministic", "gradients_nonzero_finite"} \
        and all(checks.values()), report["checks"]
    text = (out / "report.md").read_text()
    assert "ok deterministic" in text and "All 6 honesty checks passed." in text
    assert "Under the per-sample worst case over all attacks at 8/255 it is" in text
    rows = list(csv.DictReader((out / "report.csv").open()))
    # exactly the attacks and radii asked for, plus the worst case at each radius > 0
    assert sorted((r["attack"], r["eps_str"]) for r in rows) == sorted(
        [("clean", "0")] + [(a, e) for a in ("fgsm", "pgd") for e in ("0", "2/255", "8/255")]
        + [("worst", "2/255"), ("worst", "8/255")])
    by = {(r["attack"], r["eps_str"]): {k: float(v) for k, v in r.items()
                                        if k in ("acc", "bal_acc", "eps", "steps") and v}
          for r in rows}
    assert by[("pgd", "8/255")]["steps"] == 5 and by[("pgd", "8/255")]["eps"] == 8 / 255
    clean_acc = by[("clean", "0")]["acc"]
    for atk in ("fgsm", "pgd"):
        assert by[(atk, "0")]["acc"] == pytest.approx(clean_acc)  # eps=0 is clean
    assert by[("fgsm", "8/255")]["acc"] < clean_acc
    assert by[("pgd", "8/255")]["acc"] < clean_acc - 0.1
    assert by[("pgd", "8/255")]["acc"] <= by[("pgd", "2/255")]["acc"] + 0.02
    for eps in ("2/255", "8/255"):  # a sample is robust only if every attack fails on it
        worst = by[("worst", eps)]["acc"]
        assert worst <= min(by[("fgsm", eps)]["acc"], by[("pgd", eps)]["acc"]) + 1e-6
    # a checkpoint written before a datamodule option existed still evaluates (its config
    # is completed with today's default), and gives the same numbers
    old = torch.load(ckpt, weights_only=True)
    for key in ("pin_memory", "sampler", "eval_batch_size"):
        del old["medrobust_config"]["datamodule"][key]
    torch.save(old, tmp_path / "old.ckpt")
    rep_old = evaluate(compose_cfg("eval", [f"ckpt_path={tmp_path / 'old.ckpt'}",
                                            "eps_grid=[0,2/255,8/255]", "attacks.pgd.steps=5",
                                            *QUICK_FGSM,
                                            f"output_dir={tmp_path / 'old'}"], tmp_path / "evo"))
    assert rep_old["clean"] == report["clean"]
    assert [r["acc"] for r in rep_old["results"] if r["attack"] == "fgsm"] == \
        [r["acc"] for r in report["results"] if r["attack"] == "fgsm"]
    # a stranger's checkpoint whose stored config names an arbitrary callable is refused
    evil = torch.load(ckpt, weights_only=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    evil["medrobust_config"]["datamodule"]["augmentation"] = {
        "_target_": "pathlib.Path.write_text", "self": str(victim), "data": ""}
    torch.save(evil, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="pathlib.Path.write_text"):
        evaluate(compose_cfg("eval", [f"ckpt_path={tmp_path / 'evil.ckpt'}"], tmp_path / "eve"))
    assert victim.read_text() == "keep me"
    # the weights fix the number of classes: another one is one line, not a size mismatch
    with pytest.raises(ConfigError, match=r"\+datamodule.num_classes=7.*num_classes=4"):
        evaluate(compose_cfg("eval", [f"ckpt_path={ckpt}", "+datamodule.num_classes=7"],
                             tmp_path / "evn"))
    # subset=N: a seeded class-stratified N images; bad values are one line
    rep_sub = evaluate(compose_cfg("eval", [f"ckpt_path={ckpt}", "eps_grid=[0]", "subset=24",
                                            "evaluation=quick",
                                            f"output_dir={tmp_path / 'sub'}"], tmp_path / "evs"))
    assert rep_sub["n_images"] == 24 and rep_sub["subset"].startswith("24 of 96")
    with pytest.raises(ConfigError, match="subset="):
        evaluate(compose_cfg("eval", [f"ckpt_path={ckpt}", "subset=-3"], tmp_path / "evb"))
    # the same engine as the training run's test: PGD-10 at 8/255 reproduces its numbers
    cfg10 = compose_cfg("eval", [f"ckpt_path={ckpt}", "eps_grid=[8/255]",
                                 "evaluation=quick", "attacks.pgd.steps=10",
                                 "attacks.pgd.early_stop=false", f"output_dir={tmp_path / 'e10'}"],
                        tmp_path / "ev10")
    rep10 = evaluate(cfg10)
    assert rep10["clean"]["acc"] == pytest.approx(undefended_run["test"]["test/acc"])
    assert [r["attack"] for r in rep10["results"]] == ["pgd"]  # one attack: no worst case
    assert rep10["results"][0]["acc"] == pytest.approx(undefended_run["test"]["test/adv_acc"],
                                                       abs=0.03)


@pytest.mark.parametrize("override, match", [
    ("threat.eps=-0.1", "eps"),
    ("trainer.inference_mode=true", "inference_mode must be false"),
    ("threat.eps=8", "8/255"),
    ("threat.eps=inf", "finite"),
    ("+threat.epz=0.1", "threat.epz"),
    ("defense.attacks.pgd.steps=0", "steps"),
    ("attack.steps=0", "steps"),
    ("backbone=timm", None),
    ("datamodule=ham10000", "data_dir"),
    ("module.optimizer.lr=-1", r"module.optimizer.lr=-1 must be a number > 0"),
    ("datamodule.num_workers=-1", r"datamodule.num_workers=-1 must be an integer >= 0"),
    ("datamodule.sampler=foo", r"datamodule.sampler='foo' must be null or 'weighted'"),
    ("seed=abc", r"seed='abc' must be an integer or null"),
    ("backbone.width=0", r"backbone.width=0 must be an integer >= 1"),
    ("trainer.max_epochs=0", r"trainer.max_epochs=0 must be"),
    ("+module.optimizer.lrr=0.1", r"module.optimizer.*unexpected keyword argument 'lrr'"),
    ("+module.scheduler.T_maxx=3", r"module.scheduler.*unexpected keyword argument 'T_maxx'"),
    ("trainer.sync_batchnorm=true", r"trainer.sync_batchnorm=true needs CUDA"),
])
def test_bad_input_stops_at_startup(train_cfg, override, match, capsys):
    """As train.py's main runs it: exactly one ``medrobust: error:`` line on stderr, exit code
    2, no traceback, nothing trained."""
    import logging
    import re

    from lightning_modules.core.errors import exit_on_config_error

    extra = ["backbone.name=resnet_does_not_exist"] if override == "backbone=timm" else []
    cfg = train_cfg(override, *extra)
    with pytest.raises(SystemExit) as stop, exit_on_config_error(logging.getLogger("t")):
        train(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medrobust: error: "), err
    assert re.search(match or "resnet_does_not_exist", err[0]), err[0]
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


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
    assert "clean" in out and "PGD-10 @ 8/255" in out and "tested checkpoint:" in out
    ckpt = next(tmp_path.glob("train/runs/*/checkpoints/last.ckpt"))
    proc = _run([str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}", "trainer.limit_test_batches=1",
                 "evaluation=quick", "attacks.pgd.steps=3", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ckpt.parent.parent / "eval" / "last" / "report.json").is_file()


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


def _run_group(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Like :func:`_run`, in its own process group, killed whole (DDP ranks too) on timeout."""
    import signal

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[:3])} hung for {timeout} s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


DDP_DEBUG = {  # every debug mode, with the progress bar on (it read metrics on rank 0 alone)
    "limit": ["trainer.max_epochs=2"],
    "fast_dev_run": ["++trainer.fast_dev_run=true"],
    "overfit": ["trainer.max_epochs=2", "++trainer.overfit_batches=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(DDP_DEBUG))
def test_cli_ddp_sim_never_hangs(tmp_path, mode):
    fast = [o for o in CLI_FAST if "enable_progress_bar" not in o and "max_epochs" not in o]
    proc = _run_group([str(ROOT / "train.py"), *fast, "trainer=ddp_sim", *DDP_DEBUG[mode],
                       "trainer.enable_progress_bar=true", f"paths.log_dir={tmp_path}"],
                      cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test metric" in proc.stdout


@pytest.mark.slow
def test_cli_multirun(tmp_path):
    """A sweep whose middle job has a config error: the others still run, and the sweep writes
    one summary that lists every job, the failed one with its error line."""
    proc = _run([str(ROOT / "train.py"), "-m", *CLI_FAST, "defense=none,pgd_at",
                 "threat.eps=2/255,-1/255", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(tmp_path.glob("train/multiruns/*/*/metrics.json"))
    assert len(files) == 2
    defenses = {json.loads(f.read_text())["defense"]["defense"] for f in files}
    assert defenses == {"none", "pgd_at"}
    sweep = next(tmp_path.glob("train/multiruns/*"))
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("eps" in r["error"] for r in failed)
    assert all("threat.eps=-1/255" in r["overrides"] for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["defense"] for r in ok} == {"none", "pgd_at"}
    assert all(0 <= float(r["test/adv_acc"]) <= 1 and r["selected_by"] for r in ok)
    assert "4 jobs, 2 failed." in (sweep / "summary.md").read_text()


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_option(train_cfg, monkeypatch, channels_last):
    """Every image batch reaching the backbone (training, attacks, validation, test) and every
    conv weight are in the configured memory format."""
    from lightning_modules.training.module import RobustClassifier

    seen: list[tuple[bool, bool]] = []
    setup = RobustClassifier.setup

    def recording_setup(self, stage):
        def hook(module, args):
            x = args[0]
            conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
            seen.append((x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous(),
                         conv.weight.is_contiguous(memory_format=torch.channels_last)
                         and not conv.weight.is_contiguous()))
        if not seen:
            self.net.register_forward_pre_hook(hook)
        return setup(self, stage)

    monkeypatch.setattr(RobustClassifier, "setup", recording_setup)
    result = train(train_cfg(f"module.channels_last={str(channels_last).lower()}",
                             "defense=pgd_at"))
    _assert_run_outputs(result)
    assert len(seen) > 20  # training steps with PGD, validation and test with their attack
    assert all(x == channels_last and w == channels_last for x, w in seen), \
        [i for i, s in enumerate(seen) if s != (channels_last, channels_last)]


@pytest.mark.slow
def test_cli_evaluate_ddp_sim_matches_one_process(undefended_run, tmp_path):
    """evaluate.py through the Trainer: two DDP processes reduce to the single-process report,
    on 97 test images (an odd count: DistributedSampler would pad with a duplicate)."""
    ckpt = undefended_run["best_checkpoint"]
    common = [str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}", "eps_grid=[0,4/255]",
              *QUICK_FGSM, "attacks.pgd.steps=3", "trainer.enable_progress_bar=false",
              "+datamodule.n_test=97", "+datamodule.eval_batch_size=16",
              f"paths.log_dir={tmp_path}"]
    reports = {}
    for name, extra in (("one", []), ("ddp", ["trainer=ddp_sim"])):
        proc = _run([*common, *extra, f"output_dir={tmp_path / name}"], cwd=tmp_path,
                    timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    one, ddp = reports["one"], reports["ddp"]
    assert (one["devices"], ddp["devices"]) == (1, 2)
    assert one["n_images"] == ddp["n_images"] == 97  # every image once, none twice
    assert ddp["clean"] == pytest.approx(one["clean"])
    rows = {name: {(r["attack"], r["eps_str"]): r for r in rep["results"]}
            for name, rep in reports.items()}
    assert rows["one"].keys() == rows["ddp"].keys()
    for key, row in rows["one"].items():  # FGSM is deterministic; PGD starts at random
        tol = 1e-6 if key[0] == "fgsm" or key[1] == "0" else 0.05
        assert rows["ddp"][key]["acc"] == pytest.approx(row["acc"], abs=tol), key


def test_metrics_json_is_valid_json_with_nan(tmp_path):
    """NaN/inf become null: metrics.json stays valid JSON (strict parsers reject NaN)."""
    from lightning_modules.core.io import write_json

    path = write_json(tmp_path / "m.json", {"a": float("nan"), "b": torch.tensor(float("inf")),
                                            "c": [1.0, float("-inf")], "d": 0.5})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert data == {"a": None, "b": None, "c": [1.0, None], "d": 0.5}


def test_diverged_training_stops_at_the_first_non_finite_step(train_cfg, monkeypatch):
    from lightning_modules.defenses.base import NoDefense

    calls = {"n": 0}
    real = NoDefense.__call__

    def poisoned(self, *args, **kwargs):  # the 3rd step (first of epoch 1) gives NaN
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(NoDefense, "__call__", poisoned)
    cfg = train_cfg("defense=none", "trainer.max_epochs=3")  # 2 steps per epoch
    with pytest.raises(ConfigError, match=r"diverged: the training loss is nan at step 2 "
                                          r"\(epoch 1, defense none\).*module.optimizer.lr"):
        train(cfg)
    assert calls["n"] == 3  # stopped at once, not at the end of the epoch
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())
    monkeypatch.setattr(NoDefense, "__call__", real)
    with pytest.raises(ConfigError, match="training diverged"):  # a real divergence
        train(train_cfg("defense=none", "module.optimizer.lr=1e30", "trainer.max_epochs=3"))


def test_failed_honesty_check_warns_or_stops_when_strict(undefended_run, tmp_path, monkeypatch,
                                                         caplog):
    from lightning_modules.evaluation import assemble
    from lightning_modules.evaluation.honesty import Check

    monkeypatch.setattr(assemble, "model_checks",
                        lambda *a, **k: [Check("deterministic", False, "outputs differ")])
    base = [f"ckpt_path={undefended_run['best_checkpoint']}", "eps_grid=[0,2/255]",
            "evaluation=quick", "attacks.pgd.steps=2", "trainer.limit_test_batches=1"]
    report = evaluate(compose_cfg("eval", [*base, f"output_dir={tmp_path / 'a'}"], tmp_path))
    assert {"check": "deterministic", "passed": False, "detail": "outputs differ"} in \
        report["checks"]
    assert "honesty check failed: deterministic" in caplog.text
    assert "**FAILED** deterministic" in (tmp_path / "a" / "report.md").read_text()
    with pytest.raises(ConfigError, match="evaluation.strict=true and 1 honesty check"):
        evaluate(compose_cfg("eval", [*base, f"output_dir={tmp_path / 'b'}",
                                      "evaluation.strict=true"], tmp_path))
    assert (tmp_path / "b" / "report.json").is_file()  # the report is kept
