"""Train an adversarially robust classifier, then test its best checkpoint.

    python train.py                                   # PGD-AT on the embedded synthetic data
    python train.py defense=none                      # standard training
    python train.py datamodule=ham10000 datamodule.data_dir=/data/ham10000
    python train.py -m defense=none,pgd_at seed=1,2   # Hydra multirun

``train(cfg)`` is a plain function (tests and sweeps call it); ``main`` is the Hydra entry point.
Outputs in the run directory: ``checkpoints/`` (``best-clean-*``, ``best-robust-*`` and
``last.ckpt``), ``metrics.json``, ``config_resolved.yaml``, logger folders (``csv/`` by
default). The checkpoint tested is chosen by ``defense.selection`` (clean | robust | last; see
``lightning_modules/selection.py``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.base import balanced_class_weights
from lightning_modules import resume
from lightning_modules.backbones import check_input_size
from lightning_modules.selection import CRITERIA, INELIGIBLE, chance_level
from lightning_modules.utils import (
    ConfigError,
    exit_on_config_error,
    format_eps,
    instantiate_dict,
    instantiate_node,
    register_resolvers,
    write_json,
)
from lightning_modules.wandb_panels import group_runs_by_sweep

log = logging.getLogger("medrobust.train")
THREAT_KEYS = {"norm", "eps", "train_steps"}
register_resolvers()
resume.register_resolvers()  # ${run_dir:...} of conf/hydra/train.yaml, before @hydra.main


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# (key, test, what it must be): checked before anything is built, one line each
VALUE_RULES: tuple[tuple[str, Any, str], ...] = (
    ("seed", lambda v: v is None or _is_int(v), "an integer or null"),
    ("module.optimizer.lr", lambda v: _is_num(v) and v > 0, "a number > 0"),
    ("module.optimizer.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("datamodule.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("datamodule.eval_batch_size", lambda v: v is None or (_is_int(v) and v >= 1),
     "an integer >= 1 or null"),
    ("datamodule.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("datamodule.sampler", lambda v: v in (None, "none", "weighted"), "null or 'weighted'"),
    ("backbone.width", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("trainer.max_epochs", lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
     "an integer >= 1 (or -1: no limit)"),
)
_ABSENT = object()


def check_values(cfg: DictConfig) -> None:
    """One :class:`ConfigError` line for the first value of :data:`VALUE_RULES` that is out of
    range (keys a config does not have are skipped)."""
    for key, ok, what in VALUE_RULES:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{key}={value!r} must be {what}")


# what a resumed run must share with the checkpoint it resumes (else the weights do not fit)
RESUME_KEYS = ("backbone", "datamodule.num_classes", "datamodule.task", "datamodule.in_chans")


def check_resume(ckpt_path: str, run_config: dict) -> None:
    """One line when ``ckpt_path`` is missing, is not a weights-only medrobust checkpoint, or
    was trained with another network than this run builds (names the differing keys)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True).get(
            "medrobust_config") or {}
    except Exception as err:  # noqa: BLE001 - pickled code, a truncated file, not a checkpoint
        raise ConfigError(f"ckpt_path={ckpt_path!r} cannot be loaded as weights only: "
                          f"{str(err).splitlines()[0][:200]}") from err
    if not stored:
        return  # a checkpoint from before configs were stored: nothing to compare
    now, then = OmegaConf.create(run_config), OmegaConf.create(stored)
    diffs = []
    for key in RESUME_KEYS:
        a, b = OmegaConf.select(then, key), OmegaConf.select(now, key)
        if isinstance(a, DictConfig) and isinstance(b, DictConfig):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise ConfigError(f"ckpt_path={ckpt_path!r} was trained with another network than this "
                          f"run builds ({'; '.join(diffs)}); resume with the same settings")


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, callbacks, loggers and trainer from ``cfg``.

    Every piece of bad input (missing data, unknown backbone, eps < 0, ...) raises
    :class:`ConfigError` here, before any training starts.
    """
    check_values(cfg)  # also here: build() is called on its own (tests, tools)
    unknown = sorted(set(cfg.get("threat") or {}) - THREAT_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) threat.{unknown[0]} (of {unknown}); the threat model "
                          f"has {sorted(THREAT_KEYS)}")
    datamodule = instantiate_node(cfg, "datamodule")
    fill_from_data(cfg, datamodule)
    net = instantiate_node(cfg, "backbone")
    size, chans = cfg.datamodule.get("image_size"), getattr(datamodule, "in_chans", None)
    if size and chans:
        try:
            check_input_size(net, int(chans), int(size))
        except ValueError as err:
            raise ConfigError(f"backbone ({cfg.backbone.get('_target_')}"
                              f"{', ' + str(cfg.backbone.name) if 'name' in cfg.backbone else ''})"
                              f": {err}") from err
    defense, selection = build_defense(cfg)
    val_attack = instantiate_node(cfg, "attack")
    module = instantiate_node(
        cfg, "module", net=net, defense=defense, val_attack=val_attack,
        class_names=list(getattr(datamodule, "class_names", []) or []) or None,
        class_weights=resolve_class_weights(cfg.module.get("class_weights"), datamodule),
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    try:  # a typo in module.optimizer or module.scheduler: one line now, not deep in fit
        module.configure_optimizers()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"module.optimizer / module.scheduler: {type(err).__name__}: "
                          f"{err}") from err
    callbacks = instantiate_dict(cfg, "callbacks")
    loggers = instantiate_dict(cfg, "logger")
    # checkpoints written atomically (temporary file, fsync, rename), unless plugins are set
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [resume.AtomicCheckpointIO()]}
    trainer = instantiate_node(cfg, "trainer", callbacks=callbacks, logger=loggers or False,
                               **plugins)
    if getattr(trainer, "_inference_mode", False):
        raise ConfigError("trainer.inference_mode must be false: adversarial validation and "
                          "test need gradients")
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "loggers": loggers,
            "selection": selection}


def build_defense(cfg: DictConfig):
    """The defense and its checkpoint ``selection`` criterion (a key of the defense config)."""
    selection = cfg.defense.get("selection", "robust") if cfg.get("defense") else "robust"
    if selection not in CRITERIA:
        raise ConfigError(f"defense.selection={selection!r} must be one of {list(CRITERIA)}")
    return instantiate_node(cfg, "defense", drop=("selection",)), selection


def fill_from_data(cfg: DictConfig, datamodule) -> None:
    """Write ``num_classes``, ``in_chans`` and ``task`` found in the data into ``cfg.datamodule``
    where the config leaves them ``null`` (folder/CSV/MedMNIST), so the backbone and module,
    which interpolate them, and the saved config get the real values."""
    with open_dict(cfg):
        for key in ("num_classes", "in_chans", "task"):
            if cfg.datamodule.get(key) is None and getattr(datamodule, key, None) is not None:
                cfg.datamodule[key] = getattr(datamodule, key)


def resolve_class_weights(spec: Any, datamodule) -> list[float] | None:
    """``module.class_weights``: ``null``, ``balanced`` (from the training labels) or a list."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ConfigError(f"module.class_weights={spec!r} must be null, 'balanced' or a list")
        weights = balanced_class_weights(datamodule.targets("train"), datamodule.num_classes)
        log.info("class weights (balanced): %s", [round(w, 3) for w in weights])
        return weights
    return [float(w) for w in spec]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test; returns the metrics dict that is also written to ``metrics.json``."""
    start = time.perf_counter()
    check_values(cfg)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path, in_place = resume_target(cfg, out_dir)
    meta = checkpoint_meta(ckpt_path)
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
    extra_dir = resume_folder(out_dir) if in_place else out_dir
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
        with stop_on_sigterm(trainer, out_dir, state_cb):
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
        with stop_on_sigterm(trainer, out_dir, state_cb):
            trainer.test(module, datamodule=datamodule, ckpt_path=chosen["checkpoint"] or None)
        test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("test/")}

    result = {
        "task_name": cfg.get("task_name"),
        "defense": module.defense.describe(),
        "val_attack": module.val_attack.describe(),
        "threat": {"norm": module.val_attack.norm, "eps": module.val_attack.eps,
                   "eps_str": format_eps(module.val_attack.eps)},
        "seed": cfg.get("seed"),
        "seeds": seeds,
        "resumes": list(state_cb.history) if state_cb is not None else [],
        "test": test_metrics,
        "val": {k: v for k, v in fit_metrics.items() if k.startswith("val/")},
        "chance": {module.score_key: chance_level(module.task_name, module.hparams.num_classes)},
        "selection": chosen,
        "best_checkpoint": chosen["checkpoint"],  # the checkpoint tested
        "checkpoints": checkpoints,
        "last_checkpoint": checkpoints.get("last", ""),
        "output_dir": str(out_dir),
        "skipped_images": skipped_images(datamodule),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if trainer.is_global_zero:
        write_json(out_dir / "metrics.json", result)
        if cfg.get("print_summary", True):
            print(summary_table(result, parts["loggers"], out_dir), flush=True)
    return result


def resume_target(cfg: DictConfig, out_dir: Path) -> tuple[str | None, bool]:
    """The checkpoint file that ``ckpt_path`` names (``last``, a run folder or a file), and
    whether the run continues in that checkpoint's own run folder (``out_dir`` is it: Hydra
    put the job there, conf/hydra/train.yaml)."""
    raw = cfg.get("ckpt_path")
    if raw is None or str(raw) == "":
        return None, False
    runs = Path(cfg.paths.log_dir) / str(cfg.get("task_name")) / "runs"
    path, run = resume.find_checkpoint(raw, runs)
    if path is None:
        if str(raw) == "last":
            raise ConfigError(f"ckpt_path=last: no run folder under {runs} has "
                              f"checkpoints/{resume.LAST}")
        raise ConfigError(f"ckpt_path={raw!r} is a folder without checkpoints/{resume.LAST}")
    in_place = run is not None and run.resolve() == out_dir.resolve()
    return str(path), in_place


def checkpoint_meta(ckpt_path: str | None) -> dict[str, Any]:
    """``epoch``, ``global_step`` and the stored seed of a checkpoint; ``{}`` when it cannot be
    read as weights only (:func:`check_resume` then says why, in one line)."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return {}
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - check_resume reports it
        return {}
    if not isinstance(ckpt, dict):
        return {}
    state = ckpt.get(resume.CKPT_KEY) or {}
    return {"epoch": ckpt.get("epoch"), "global_step": int(ckpt.get("global_step") or 0),
            "seed": state.get("seed")}


def resume_folder(out_dir: Path) -> Path:
    """``<run>/resumes/<time>``: where a resumed job writes its config and seeds (the folder
    of Hydra's ``.hydra/`` files of this job when Hydra runs it)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        sub = Path(str(HydraConfig.get().output_subdir or ""))
        if sub.parts[:1] == ("resumes",):
            return out_dir / sub.parent
    return out_dir / "resumes" / time.strftime("%Y-%m-%d_%H-%M-%S")


def seeds_used(cfg: DictConfig, seed: int, source: str) -> dict[str, Any]:
    """The seeds of this run, for ``seeds.json`` and ``metrics.json``: the run seed (from the
    config, the checkpoint resumed, or drawn when ``seed=null``), every other ``seed`` /
    ``*_seed`` key of the config, and how the rest derive from the run seed."""
    components: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if (k == "seed" or str(k).endswith("_seed")) and key != "seed" and \
                        (v is None or isinstance(v, int)):
                    components[key] = v
                else:
                    walk(v, key)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {
        "seed": int(seed),
        "seed_source": source,
        "seed_config": cfg.get("seed"),
        "deterministic": cfg.trainer.get("deterministic", False),
        "components": components,
        "derived": {
            "torch, numpy, python random": "seed (lightning.seed_everything, workers=True)",
            "dataloader workers": "torch base seed drawn per epoch + worker id (Lightning's "
                                  "pl_worker_init_function, datamodules.augment.seed_worker)",
            "augmentation (albumentations)": "torch.initial_seed() + DDP rank "
                                             "(datamodules.augment.build_augmentation)",
        },
        "torch_initial_seed": int(torch.initial_seed()),
    }


@contextmanager
def stop_on_sigterm(trainer: L.Trainer, out_dir: Path, state_cb: Any) -> Iterator[None]:
    """Lightning ends ``fit``/``test`` with ``SIGTERMException`` (a ``SystemExit`` of code 0)
    after the batch that SIGTERM interrupted; :class:`ResumeState` has written ``last.ckpt``.
    This turns it into :class:`resume.TrainingInterrupted` with one line that says so."""
    try:
        with resume.lightning_handles_sigterm():
            yield
    except SIGTERMException:
        stage = "testing" if trainer.state.fn == "test" else "training"
        saved = getattr(state_cb, "last_ckpt", None)
        where = (f"saved {saved}; resume with: python train.py ckpt_path={out_dir}"
                 if stage == "training" and saved and Path(saved).is_file()
                 else "no checkpoint written (no resume callback)" if stage == "training"
                 else f"training had finished; test again with: python train.py "
                      f"ckpt_path={out_dir}")
        raise resume.TrainingInterrupted(
            f"stopped by SIGTERM while {stage} (epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}); {where}") from None


def checkpoint_paths(trainer: L.Trainer) -> dict[str, str]:
    """``{"best_clean": ..., "best_robust": ..., "last": ...}`` as written by the callbacks."""
    out = {}
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor and cb.monitor.startswith("val/sel_") and cb.best_model_path:
            out["best_" + cb.monitor[len("val/sel_"):]] = cb.best_model_path
        if cb.monitor is None and cb.best_model_path:  # conf/callbacks/default.yaml: last
            out["last"] = cb.best_model_path
    return out


def choose_checkpoint(trainer: L.Trainer, paths: dict[str, str], module, criterion: str
                      ) -> dict[str, Any]:
    """The checkpoint to test for ``criterion`` (clean | robust | last), its epoch, and whether
    it is the fallback to ``last`` because no epoch was eligible."""
    path, fallback = paths.get("last", ""), False
    if criterion != "last":
        cb = next((c for c in trainer.checkpoint_callbacks
                   if c.monitor == f"val/sel_{criterion}"), None)
        if cb is not None and cb.best_model_path:
            fallback = cb.best_model_score is not None and \
                float(cb.best_model_score) <= INELIGIBLE
            path = path if fallback else cb.best_model_path
    epoch = None
    if path and Path(path).is_file():
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    return {"criterion": criterion, "checkpoint": path, "epoch": epoch, "fallback": fallback,
            "ineligible_epochs": {str(k): v for k, v in module.ineligible_epochs.items()}}


def skipped_images(datamodule) -> list[str]:
    """Unreadable images skipped during the run (datamodules that read files)."""
    fn = getattr(datamodule, "skipped_images", None)
    return fn() if fn is not None else []


def summary_table(result: dict[str, Any], loggers: list, out_dir: Path) -> str:
    """The short table printed at the end of a run."""
    atk = result["val_attack"]
    atk_name = f"{atk['attack'].upper()}-{atk.get('steps', 1)}" if atk["attack"] == "pgd" \
        else atk["attack"].upper()
    eps = result["threat"]["eps_str"]
    lines = [
        "",
        f"== medrobust: defense={result['defense']['defense']}  "
        f"threat={result['threat']['norm']} eps={eps}  ({result['wall_time_s']:.0f} s) ==",
    ]
    test = result["test"]
    names = sorted({k.split("/", 1)[1] for k in test if not k.split("/", 1)[1].startswith("adv_")
                    and not k.endswith("loss")})
    if names:
        names.sort(key=lambda n: ("/" in n, n))  # summary metrics first, then per class
        width = max(14, 2 + max(len(n) for n in names))
        chance = result.get("chance", {})
        lines.append(f"{'test metric':<{width}}{'clean':>10}{atk_name + ' @ ' + eps:>22}"
                     f"{'chance':>9}")
        for name in names:
            clean = test.get(f"test/{name}")
            adv = test.get(f"test/adv_{name}")
            fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
            level = f"{chance[name]:>9.4f}" if name in chance else ""
            lines.append(f"{name:<{width}}{fmt(clean):>10}{fmt(adv):>22}{level}")
    else:
        lines.append("(no test metrics: test=false)")
    skipped = result.get("skipped_images") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[:3]}")
    sel = result["selection"]
    how = "the last epoch" if sel["criterion"] == "last" else \
        f"{sel['criterion']} validation score"
    lines.append(f"tested checkpoint: {sel['checkpoint'] or '-'} (epoch {sel['epoch']}, "
                 f"selected by {how}"
                 + ("; NO EPOCH WAS ELIGIBLE: last checkpoint)" if sel["fallback"] else ")"))
    lines.append(f"metrics JSON:      {out_dir / 'metrics.json'}")
    log_dirs = sorted({str(getattr(lg, 'log_dir', None) or getattr(lg, 'save_dir', '') or '')
                       for lg in loggers} - {""})
    lines.append(f"logs:              {', '.join(log_dirs) if log_dirs else str(out_dir)}")
    return "\n".join(lines)


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _train_one_job(cfg: DictConfig) -> dict[str, Any] | None:
    """One job of a multirun: its error is written to ``error.txt`` in its folder and logged,
    and the sweep goes on (the sweep summary lists it)."""
    try:
        return train(cfg)
    except Exception as err:  # noqa: BLE001 - one job's failure must not stop the sweep
        line = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        log.exception("job failed: %s", line)
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").write_text(line.splitlines()[0] if line else type(err).__name__)
        print(f"medrobust: error: {line}", file=sys.stderr, flush=True)
        return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with resume.sigterm_interrupts():
            if _in_multirun():
                group_runs_by_sweep(cfg)  # wandb: the runs of a sweep form one group
                metrics = _train_one_job(cfg)
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
        _finish_wandb()
    key = cfg.get("optimized_metric")
    if key:
        value = metrics["test"].get(key, metrics["val"].get(key))
        return None if value is None else float(value)
    return None


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
