"""Clusters and sweeps: the SLURM launcher follows the trainer, multi-node DDP under SLURM, a
submitit job and an Optuna search run end to end on CPU."""

from __future__ import annotations

import json
import os
import signal

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF, FAST, ROOT
from tests.test_train import _run_group as _run

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher")

CLI_FAST = [o for o in FAST if not o.startswith("print_summary")] + ["backbone.width=8"]


def _compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("trainer,nodes,devices", [("ddp_multinode", None, None),
                                                    ("ddp_multinode", 3, 8), ("ddp", None, 2)])
def test_slurm_launcher_follows_the_trainer(trainer, nodes, devices):
    overrides = ["hydra/launcher=slurm", f"trainer={trainer}"]
    overrides += [f"trainer.num_nodes={nodes}"] if nodes else []
    overrides += [f"trainer.devices={devices}"] if devices else []
    cfg = _compose_hydra(overrides)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["nodes"] == cfg.trainer.get("num_nodes", 1) == \
        (nodes or (2 if trainer == "ddp_multinode" else 1))
    assert launcher["tasks_per_node"] == cfg.trainer.devices == (devices or 4)
    assert launcher["gpus_per_node"] == cfg.trainer.devices
    assert launcher["additional_parameters"]["signal"].startswith("USR1@")  # Lightning's
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    # as Hydra builds it (interpolations into the trainer resolved from the root config)
    built = instantiate(cfg.hydra.launcher)
    assert (built.params["nodes"], built.params["tasks_per_node"]) == \
        (launcher["nodes"], cfg.trainer.devices)


def test_ddp_multinode_under_slurm_takes_ranks_from_slurm(monkeypatch, tmp_path):
    """Lightning detects SLURM by itself (auto-requeue on) and refuses a trainer that disagrees
    with the allocation."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    cfg = _compose_hydra(["trainer=ddp_multinode", "trainer.accelerator=cpu"])
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2",
             "SLURM_JOB_NAME": "train", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # SLURMEnvironment writes MASTER_ADDR/PORT into os.environ: they must be restored, or a
    # later DDP run in a subprocess of this pytest process looks for its master at "gpu01"
    # and hangs (setenv first, so that monkeypatch also undoes a key that was absent)
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
        monkeypatch.delenv(key)
    # the trainer sets the process-wide rank (5 here): put it back after the test
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    for fn in (rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(fn, "rank", fn.rank)
    trainer = instantiate(cfg.trainer, default_root_dir=tmp_path, logger=False,
                          enable_checkpointing=False)
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    assert env.requeue_signal == signal.SIGUSR1  # the signal conf/hydra/launcher/slurm.yaml asks
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == \
        (8, 5, 1, 1)
    assert env.main_address == "gpu01"
    with pytest.raises(ValueError, match="ntasks-per-node"):
        env.validate_settings(num_devices=2, num_nodes=2)


def test_slurm_multirun_submits_what_the_trainer_needs(tmp_path, monkeypatch):
    """The README's command, up to sbatch: a stand-in sbatch keeps the script and refuses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = _run([str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "trainer=ddp_multinode",
                 "trainer.num_nodes=2", "trainer.devices=4", "hydra.launcher.partition=gpu",
                 f"paths.log_dir={tmp_path / 'logs'}", "defense=none,pgd_at"],
                cwd=tmp_path, timeout=120)
    script = (tmp_path / "job.sh").read_text() if (tmp_path / "job.sh").is_file() else ""
    assert script, proc.stderr[-3000:]
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--signal=USR1@120", "--array=0-1"):
        assert f"#SBATCH {line}" in script, script
    assert "srun" in script and "submitit.core._submit" in script


@pytest.mark.slow
def test_submitit_local_runs_a_job_and_the_sweep_summary(tmp_path):
    """Two jobs through submitit's local executor, each with an offline wandb run (finished, or
    the job would never return) grouped by the sweep folder; the summary has one row per job
    with that job's own override and the numbers of that job's metrics.json."""
    import csv

    proc = _run([str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *CLI_FAST,
                 "defense=none", "logger=wandb", "callbacks.wandb_examples.n_images=2",
                 f"paths.log_dir={tmp_path / 'logs'}", "seed=1,2"], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows] == ["0", "1"]
    summary = (sweep / "summary.md").read_text()
    assert "2 jobs, 0 failed." in summary
    for row, seed in zip(rows, (1, 2), strict=True):
        job = sweep / row["job"]
        assert row["overrides"] == f"seed={seed}" and row["status"] == "ok"
        assert f"seed={seed}" in OmegaConf.load(job / ".hydra" / "overrides.yaml")
        config = OmegaConf.load(job / "config_resolved.yaml")
        assert config.seed == seed  # the override reached the job it is listed under
        metrics = json.loads((job / "metrics.json").read_text())
        assert float(row["wall_time_s"]) == metrics["wall_time_s"] > 0
        for key in ("test/acc", "test/adv_acc"):
            assert 0.0 <= metrics["test"][key] <= 1.0
            assert float(row[key]) == metrics["test"][key], (row["job"], key)
        acc = metrics["test"]["test/acc"]
        assert f"| {row['job']} | seed={seed} | ok | none |" in summary
        assert f" {acc:.4f} |" in summary.split(f"| {row['job']} | seed={seed} |")[1].split("\n")[0]
        assert config.logger.wandb.group == sweep.name
        assert list(job.glob("wandb/offline-run-*"))


@pytest.mark.slow
def test_optuna_search_maximises_the_robust_validation_score(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper")
    proc = _run([str(ROOT / "train.py"), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                 *(o for o in CLI_FAST if not o.startswith("datamodule.batch_size")),
                 "datamodule.n_val=16", "datamodule.n_test=16",
                 f"paths.log_dir={tmp_path / 'logs'}"], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    scores = [json.loads((sweep / job / "metrics.json").read_text())["val"]["val/sel_robust_best"]
              for job in ("0", "1")]
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.best_value == pytest.approx(max(scores))
    assert set(result.best_params) == {"module.optimizer.lr", "module.optimizer.weight_decay",
                                       "datamodule.batch_size"}
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | module.optimizer.lr=" in summary and "2 jobs, 0 failed" in summary
