"""Resume that resumes (issue 13): a run killed mid-epoch and resumed in its own folder ends as
the uninterrupted run does; SIGTERM writes last.ckpt and exits 143 with one line; checkpoints
are written atomically; the seeds used are in the run folder.

The runs are ``train.main()`` (Hydra and all) in forked processes: the CLI path without the
seconds of imports a fresh interpreter costs. Each child uses one thread (same float sums in
every run) and is killed if it outlives its timeout.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import runpy
import signal
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.training import resume
from tests.conftest import FAST, ROOT

RUN = [o for o in FAST if not o.startswith(("trainer.max_epochs", "print_summary"))] + [
    "backbone.width=8", "trainer.max_epochs=3", "trainer.deterministic=true",
    "print_summary=false"]
TIMEOUT = 240


def _child(args: list[str], kill_at: tuple[int, int] | None) -> None:
    torch.set_num_threads(1)
    if kill_at is not None:  # this process sends itself a signal after batch `step`
        step, signum = kill_at
        if step < 0:  # ... or while the run is being built (build.py imports it by name)
            from lightning_modules.training import build

            instantiate_dict = build.instantiate_dict

            def signal_then_instantiate(*args, **kwargs):
                os.kill(os.getpid(), signum)
                return instantiate_dict(*args, **kwargs)

            build.instantiate_dict = signal_then_instantiate

        own = resume.ResumeState.on_train_batch_end

        def on_train_batch_end(self, trainer, *args):
            own(self, trainer, *args)
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)

        resume.ResumeState.on_train_batch_end = on_train_batch_end
    sys.argv = [str(ROOT / "train.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")  # as `python train.py ...` runs it


def _start(args: list[str], kill_at: tuple[int, int] | None = None) -> mp.Process:
    proc = mp.get_context("fork").Process(target=_child, args=(args, kill_at))
    proc.start()
    return proc


def _wait(proc: mp.Process, timeout: int = TIMEOUT) -> int:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"run still going after {timeout} s")
    return proc.exitcode


def _run_folder(log_dir: Path) -> Path:
    (run,) = (log_dir / "train" / "runs").iterdir()
    return run


def _final(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    metrics = json.loads((run / "metrics.json").read_text())
    return {"ckpt": ckpt, "metrics": metrics}


def test_killed_run_resumes_to_the_same_end(tmp_path):
    """3 epochs of PGD-AT (random starts draw from the RNG) uninterrupted, and the same run
    SIGKILLed after the first batch of epoch 2, then resumed with ckpt_path=<run folder>:
    same global step, bitwise-equal weights, optimizer and metrics, same best checkpoints."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = _start([*RUN, f"paths.log_dir={full_dir}"])
    killed = _start([*RUN, f"paths.log_dir={cut_dir}"], kill_at=(3, signal.SIGKILL))
    assert _wait(killed) == -signal.SIGKILL
    run = _run_folder(cut_dir)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (run / "metrics.json").exists()
    assert _wait(_start([*RUN, f"paths.log_dir={cut_dir}", f"ckpt_path={run}"])) == 0
    assert _wait(full) == 0
    assert _run_folder(cut_dir) == run  # resumed in its own folder, no new one
    a, b = _final(_run_folder(full_dir)), _final(run)

    assert a["ckpt"]["global_step"] == b["ckpt"]["global_step"] == 6
    for key, value in a["ckpt"]["state_dict"].items():
        assert torch.equal(value, b["ckpt"]["state_dict"][key]), key
    for sa, sb in zip(a["ckpt"]["optimizer_states"][0]["state"].values(),
                      b["ckpt"]["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["ckpt"]["lr_schedulers"] == b["ckpt"]["lr_schedulers"]
    ma, mb = a["metrics"], b["metrics"]
    assert ma["test"] == mb["test"] and ma["val"] == mb["val"]
    assert "val/adv_score_best" in mb["val"] and "val/sel_robust_best" in mb["val"]
    assert ma["selection"]["epoch"] == mb["selection"]["epoch"]
    assert {k: Path(v).name for k, v in ma["checkpoints"].items()} == \
        {k: Path(v).name for k, v in mb["checkpoints"].items()}
    assert ma["resumes"] == [] and [(r["epoch"], r["global_step"]) for r in mb["resumes"]] == \
        [(0, 2)]
    # what the killed run wrote is kept: its .hydra/ files, its CSV rows before the checkpoint
    assert (run / ".hydra" / "overrides.yaml").is_file()
    assert len(list(run.glob("resumes/*/.hydra/overrides.yaml"))) == 1
    def rows(folder):  # every logged value but the wall-clock ones (time/train_s)
        with open(folder / "csv" / "metrics.csv") as f:
            return [{k: v for k, v in r.items() if not k.startswith("time/")}
                    for r in csv.DictReader(f)]

    csv_a, csv_b = rows(_run_folder(full_dir)), rows(run)
    assert csv_a == csv_b and "time/train_s" in (run / "csv" / "metrics.csv").read_text()


def test_sigterm_saves_last_checkpoint_and_exits_143(tmp_path, capfd):
    log_dir = tmp_path / "logs"
    code = _wait(_start([*RUN, f"paths.log_dir={log_dir}"], kill_at=(3, signal.SIGTERM)))
    err = capfd.readouterr().err
    assert code == resume.SIGTERM_EXIT_CODE
    lines = [ln for ln in err.splitlines() if ln.startswith("medrobust: error:")]
    assert len(lines) == 1 and "stopped by SIGTERM while training" in lines[0], err[-2000:]
    assert "Traceback" not in err
    run = _run_folder(log_dir)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # the batch SIGTERM interrupted, then the checkpoint
    assert not list(run.glob("checkpoints/.*tmp*"))
    # and the run resumes from it (ckpt_path=last: this task's newest run) to the end
    assert _wait(_start([*RUN, f"paths.log_dir={log_dir}", "ckpt_path=last"])) == 0
    assert _run_folder(log_dir) == run
    assert _final(run)["ckpt"]["global_step"] == 6


def test_last_checkpoint_every_n_steps(tmp_path):
    """callbacks.resume.every_n_train_steps=1: a run SIGKILLed mid-epoch loses no step."""
    log_dir = tmp_path / "logs"
    code = _wait(_start([*RUN, f"paths.log_dir={log_dir}", "callbacks.resume.every_n_train_steps=1"],
                        kill_at=(3, signal.SIGKILL)))
    assert code == -signal.SIGKILL
    ckpt = torch.load(_run_folder(log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and resume.CKPT_KEY in ckpt
    with pytest.raises(ValueError, match="every_n_train_steps=0"):
        resume.ResumeState(last_ckpt=None, every_n_train_steps=0)


def test_sigterm_before_training_is_one_line(tmp_path, capfd):
    """SIGTERM while the run is being built (before Lightning's handler): one line, exit 143."""
    code = _wait(_start([*RUN, f"paths.log_dir={tmp_path}"], kill_at=(-1, signal.SIGTERM)))
    err = capfd.readouterr().err
    assert code == resume.SIGTERM_EXIT_CODE, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("medrobust: error:")]
    assert lines == ["medrobust: error: stopped by SIGTERM outside training and testing "
                     "(nothing to save; the checkpoints written so far are kept)"]
    assert "Traceback" not in err


def test_seeds_are_recorded(train_cfg, monkeypatch):
    from train import train

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # set by earlier runs in this process
    result = train(train_cfg("defense=none", "seed=null", "datamodule.seed=7"))
    seeds = json.loads((Path(result["output_dir"]) / "seeds.json").read_text())
    assert seeds["seed_source"] == "drawn" and isinstance(seeds["seed"], int)
    assert seeds["components"]["datamodule.seed"] == 7
    assert result["seeds"] == seeds
    assert seeds["deterministic"] is False


def test_find_checkpoint(tmp_path):
    runs = tmp_path / "train" / "runs"
    old, new = runs / "a", runs / "b"
    for run in (old, new):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (new / "checkpoints" / "best.ckpt").write_bytes(b"x")
    os.utime(old / "checkpoints" / "last.ckpt", (1, 1))
    last = new / "checkpoints" / "last.ckpt"
    assert resume.find_checkpoint("last", runs) == (last, new)
    assert resume.find_checkpoint(str(new), runs) == (last, new)
    assert resume.find_checkpoint(str(last), runs) == (last, new)
    # any other checkpoint starts a new run folder from its state
    assert resume.find_checkpoint(str(new / "checkpoints" / "best.ckpt"), runs) == \
        (new / "checkpoints" / "best.ckpt", None)
    assert resume.find_checkpoint(None, runs) == (None, None)
    assert resume.find_checkpoint("last", tmp_path / "none") == (None, None)
    assert resume.find_checkpoint(str(tmp_path), runs) == (None, None)  # no last.ckpt there
    gone = tmp_path / "gone" / "checkpoints" / "last.ckpt"  # no folder made for it
    assert resume.find_checkpoint(str(gone), runs) == (gone, None)


def test_bad_resume_targets_are_one_line(train_cfg, tmp_path):
    from lightning_modules.core.errors import ConfigError
    from train import train

    with pytest.raises(ConfigError, match="ckpt_path=last: no run folder"):
        train(train_cfg("ckpt_path=last"))
    with pytest.raises(ConfigError, match="is a folder without checkpoints/last.ckpt"):
        train(train_cfg(f"ckpt_path={tmp_path}"))


def test_atomic_checkpoint_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = resume.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_rng_states_round_trip_weights_only(tmp_path):
    import random

    import numpy as np

    states = resume.collect_rng_states()
    first = (torch.rand(2), np.random.rand(2), random.random())
    path = tmp_path / "s.pt"
    torch.save(states, path)
    resume.set_rng_states(torch.load(path, weights_only=True))
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all()
    assert first[2] == again[2]


def _eval_child(args: list[str], kill_after_batch: int | None) -> None:
    torch.set_num_threads(1)
    if kill_after_batch is not None:  # SIGTERM to itself once that batch is done and saved
        from lightning_modules.evaluation import module as evaluation_module

        own = evaluation_module.EvaluationModule.test_step

        def test_step(self, batch, batch_idx):
            own(self, batch, batch_idx)
            if batch_idx == kill_after_batch:
                os.kill(os.getpid(), signal.SIGTERM)

        evaluation_module.EvaluationModule.test_step = test_step
    sys.argv = [str(ROOT / "evaluate.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


def test_sigterm_stops_evaluation_after_the_batch_keeps_it_and_resumes(tmp_path, capfd):
    """evaluate.py under SIGTERM: the batch in progress ends and is kept, then one line that
    says how to resume and exit 143; the same command then resumes from the kept batch."""
    log_dir = tmp_path / "logs"
    assert _wait(_start([*RUN, f"paths.log_dir={log_dir}", "trainer.max_epochs=1"])) == 0
    ckpt = _run_folder(log_dir) / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    args = [f"ckpt_path={ckpt}", "evaluation=quick", "eps_grid=[0,8/255]", "subset=32",
            "+datamodule.eval_batch_size=8", "attacks.pgd.steps=2", f"output_dir={out}",
            "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path / 'elogs'}"]
    proc = mp.get_context("fork").Process(target=_eval_child, args=(args, 0))
    proc.start()
    code = _wait(proc)
    err = capfd.readouterr().err
    assert code == resume.SIGTERM_EXIT_CODE, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("medrobust: error:")]
    assert len(lines) == 1 and "stopped by SIGTERM while evaluating" in lines[0], err[-2000:]
    assert "1 batch file(s) kept" in lines[0] and "rerun the same command" in lines[0]
    assert "Traceback" not in err
    assert len(list((out / "partial").glob("rank0-batch*.pt"))) == 1  # 1 of 4 batches
    assert not (out / "report.json").exists()
    proc = mp.get_context("fork").Process(target=_eval_child, args=(args, None))
    proc.start()
    assert _wait(proc) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_batches"] == 1 and report["n_images"] == 32
