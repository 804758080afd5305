"""Train an adversarially robust classifier, then test its best checkpoint.

    python train.py                                   # PGD-AT on the embedded synthetic data
    python train.py defense=none                      # standard training
    python train.py datamodule=ham10000 datamodule.data_dir=/data/ham10000
    python train.py -m defense=none,pgd_at seed=1,2   # Hydra multirun

``train(cfg)`` is a plain function (tests and sweeps call it); ``main`` is the Hydra entry point.
Outputs in the run directory: ``checkpoints/`` (``best-clean-*``, ``best-robust-*`` and
``last.ckpt``), ``metrics.json``, ``config_resolved.yaml``, logger folders (``csv/`` by
default). The checkpoint tested is chosen by ``defense.selection`` (clean | robust | last;
``lightning_modules/training/selection.py``). The pieces: ``lightning_modules/training/``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.config import register_resolvers
from lightning_modules.core.errors import ConfigError, exit_on_config_error
from lightning_modules.core.io import write_json
from lightning_modules.training import jobs, resume
from lightning_modules.training.build import build
from lightning_modules.training.checks import check_resume, check_values
from lightning_modules.training.selection import checkpoint_paths, choose_checkpoint
from lightning_modules.training.summary import run_record, seeds_used, summary_table
from lightning_modules.training.wandb_panels import group_runs_by_sweep

log = logging.getLogger("medrobust.train")
register_resolvers()
resume.register_resolvers()  # ${run_dir:...} of conf/hydra/train.yaml, before @hydra.main


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test; returns the metrics dict that is also written to ``metrics.json``."""
    start = time.perf_counter()
    check_values(cfg)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path, in_place = resume.resume_target(cfg, out_dir)
    meta = resume.checkpoint_meta(ckpt_path)
    seed, seed_source = cfg.get("seed"), "config"
    if seed is None and meta.get("seed") is not None:
        seed, seed_source = meta["seed"], "checkpoint"  # a resumed seed=null run keeps its seed
    elif seed is None:  # Lightning draws one, or takes rank 0's from PL_GLOBAL_SEED (DDP)
        seed_source = "PL_GLOBAL_SEED" if os.environ.get("PL_GLOBAL_SEED") else "drawn"
    seed = L.seed_everything(seed, workers=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = build(cfg)
    trainer: L.Trainer = parts["trainer"]
    module, datamodule = parts["module"], parts["datamodule"]
    if cfg.trainer.get("sync_batchnorm") and \
            not isinstance(trainer.accelerator, L.pytorch.accelerators.CUDAAccelerator):
        raise ConfigError("trainer.sync_batchnorm=true needs CUDA devices (torch's "
                          "SyncBatchNorm runs on GPUs only); set it to false here")
    if ckpt_path:  # before anything in the run folder changes
        check_resume(ckpt_path, module.run_config)
    state_cb = next((c for c in trainer.callbacks if isinstance(c, resume.ResumeState)), None)
    if state_cb is not None:
        state_cb.seed = seed
    # a run resumed in its own folder keeps what it wrote: this job's config and seeds go to
    # resumes/<time>/ (with Hydra's .hydra/ files), the CSV log keeps its rows
    extra_dir = resume.resume_folder(out_dir) if in_place else out_dir
    seeds = seeds_used(cfg, seed, seed_source)
    if trainer.is_global_zero:
        extra_dir.mkdir(parents=True, exist_ok=True)
        (extra_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json(extra_dir / "seeds.json", seeds)
        if in_place and (out_dir / "metrics.json").is_file():
            (out_dir / "metrics.json").replace(extra_dir / "metrics_before_resume.json")
    kept_rows = resume.read_csv_rows(parts["loggers"], meta.get("global_step", 0)) \
        if in_place and trainer.is_global_zero else {}
    for lg in parts["loggers"]:
        lg.log_hyperparams(module.run_config)
    resume.restore_csv_rows(parts["loggers"], kept_rows)

    if ckpt_path:
        log.info("resuming %s (epoch %s, step %s) in %s%s", ckpt_path, meta.get("epoch"),
                 meta.get("global_step"), out_dir, "" if in_place else " (a new run folder)")
    if cfg.get("train", True):
        with resume.stop_on_sigterm(trainer, out_dir, state_cb):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    checkpoints = checkpoint_paths(trainer)  # before testing: test restores callback states
    chosen = choose_checkpoint(trainer, checkpoints, module, parts["selection"])
    if chosen["fallback"]:
        log.warning("no epoch was eligible for selection (%s): testing the last checkpoint",
                    "; ".join(f"epoch {e}: {why}" for e, why in module.ineligible_epochs.items()))
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        if not chosen["checkpoint"]:
            log.warning("no checkpoint (checkpointing off?): testing the current weights")
        with resume.stop_on_sigterm(trainer, out_dir, state_cb):
            trainer.test(module, datamodule=datamodule, ckpt_path=chosen["checkpoint"] or None)
        test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("test/")}

    result = run_record(cfg, module, datamodule, seeds, state_cb, test_metrics, fit_metrics,
                        chosen, checkpoints, out_dir, time.perf_counter() - start)
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", result)
        if cfg.get("print_summary", True):
            print(summary_table(result, parts["loggers"], out_dir), flush=True)
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with resume.sigterm_interrupts():
            if jobs.in_multirun():
                group_runs_by_sweep(cfg)  # wandb: the runs of a sweep form one group
                metrics = jobs.run_job(train, cfg)
                if metrics is None:
                    return None
            else:
                with exit_on_config_error(log):
                    metrics = train(cfg)
    except resume.TrainingInterrupted as err:  # SIGTERM: last.ckpt written, exit 143
        log.error("%s", err)
        print(f"medrobust: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(resume.SIGTERM_EXIT_CODE) from None
    finally:
        jobs.finish_wandb()
    key = cfg.get("optimized_metric")
    if key:
        value = metrics["test"].get(key, metrics["val"].get(key))
        return None if value is None else float(value)
    return None


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
