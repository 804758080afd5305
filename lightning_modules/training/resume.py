"""Resuming a run where it stopped: which folder, which checkpoint, and the state that
Lightning's own checkpoint does not hold.

- :func:`find_checkpoint`: ``ckpt_path`` as given (``last``, a run folder, a file) -> the
  checkpoint file and, when the file is a run's ``checkpoints/last.ckpt``, that run folder.
- :func:`register_resolvers`: ``${run_dir:...}`` and ``${hydra_subdir:...}``, which
  ``conf/hydra/train.yaml`` uses so that Hydra itself runs a resumed job in the original run
  folder (and keeps that run's ``.hydra/`` files).
- :class:`ResumeState`: a callback that stores in every checkpoint the RNG states (torch,
  CUDA, numpy, python ``random``, the training transform's albumentations generators), the
  module's best validation scores (``val/adv_score_best``, ``val/sel_robust_best``) and ineligible epochs, the seed and
  the resume history, and restores them on  On SIGTERM during ``fit`` it writes
  ``last.ckpt`` before Lightning stops the run.
- :class:`AtomicCheckpointIO`: checkpoints written to a temporary file in the same folder,
  fsynced, then renamed over the old one, so a crash never leaves a partial ``last.ckpt``.

Lightning restores the rest: weights, optimizer, scheduler, loop counters and the
``ModelCheckpoint`` callbacks' best scores (matched by their ``state_key``; only when the
checkpoint folder is the same, hence resuming in the original run folder).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.errors import ConfigError

__all__ = ["AtomicCheckpointIO", "ResumeState", "TrainingInterrupted", "find_checkpoint",
           "register_resolvers", "SIGTERM_EXIT_CODE"]

log = logging.getLogger("medrobust.resume")
CKPT_KEY = "medrobust_resume"  # the key of this module's state in a checkpoint
LAST = "last.ckpt"
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process ended by SIGTERM


# the module's running-best metrics (torchmetrics states are not in its state_dict):
# val/adv_score_best and val/sel_robust_best
RUNNING_BEST = ("val_score_best", "sel_robust_best")


class TrainingInterrupted(BaseException):
    """The run was stopped by a signal (a checkpoint to resume from was written). A
    ``BaseException``, so that a sweep does not take it for one job's error and go on."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise TrainingInterrupted("stopped by SIGTERM outside training and testing (nothing to "
                              "save; the checkpoints written so far are kept)")


def _swap_sigterm(handler: Any) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For ``main``: SIGTERM while the run is being built or between fit and test raises
    :class:`TrainingInterrupted` (one line, exit 143) instead of ending the process silently."""
    yield from _swap_sigterm(_raise_interrupted)


@contextmanager
def lightning_handles_sigterm() -> Iterator[None]:
    """Around ``fit``/``test``: Lightning's own handler alone (it would also call an installed
    one, whose exception would stop the run in the middle of a batch)."""
    yield from _swap_sigterm(signal.SIG_DFL)


# ----------------------------------------------------------------------- where to resume from
def _newest_run(runs_dir: Path) -> Path | None:
    """The run folder under ``runs_dir`` whose ``checkpoints/last.ckpt`` was written last."""
    found = [p for p in runs_dir.glob(f"*/checkpoints/{LAST}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent if found else None


def find_checkpoint(ckpt_path: Any, runs_dir: str | Path) -> tuple[Path | None, Path | None]:
    """``(checkpoint file, run folder)`` for ``ckpt_path``: ``last`` (the run under
    ``runs_dir`` whose ``last.ckpt`` is newest), a run folder (its ``checkpoints/last.ckpt``)
    or a checkpoint file. The run folder is set only for a run's ``checkpoints/last.ckpt``: the
    run continues there. Another file (a best checkpoint, one from elsewhere) starts a new run
    folder from its state. A file that does not exist comes back as it is (the caller says
    so); ``(None, None)`` when ``last`` or a folder has no ``last.ckpt``. Never raises."""
    if ckpt_path is None or str(ckpt_path).strip() in ("", "None", "null"):
        return None, None
    text = str(ckpt_path)
    if text == "last":
        run = _newest_run(Path(runs_dir))
        return (run / "checkpoints" / LAST, run) if run is not None else (None, None)
    path = Path(text)
    if path.is_dir():
        last = path / "checkpoints" / LAST
        if not last.is_file() and path.name == "checkpoints":
            last, path = path / LAST, path.parent
        return (last, path) if last.is_file() else (None, None)
    if path.name == LAST and path.parent.name == "checkpoints" and path.is_file():
        return path, path.parent.parent
    return path, None


_RESOLVED: dict[tuple, Any] = {}  # one answer per job: the folders change once the run starts


def _run_dir(ckpt_path: Any, runs_dir: str, stamp: str) -> str:
    key = ("run_dir", ckpt_path, runs_dir, stamp)
    if key not in _RESOLVED:
        _, run = find_checkpoint(ckpt_path, runs_dir)
        _RESOLVED[key] = str(run) if run is not None else f"{runs_dir}/{stamp}"
    return _RESOLVED[key]


def _hydra_subdir(ckpt_path: Any, runs_dir: str, stamp: str) -> str:
    key = ("subdir", ckpt_path, runs_dir, stamp)
    if key not in _RESOLVED:
        _, run = find_checkpoint(ckpt_path, runs_dir)
        _RESOLVED[key] = ".hydra" if run is None else f"resumes/{stamp}/.hydra"
    return _RESOLVED[key]


def register_resolvers() -> None:
    """``${run_dir:<ckpt_path>,<runs dir>,<stamp>}``: the run folder to resume in, else
    ``<runs dir>/<stamp>``; ``${hydra_subdir:...}``: ``.hydra`` for a new run, and
    ``resumes/<stamp>/.hydra`` for a resumed one (the original ``.hydra/`` is kept). Registered
    before ``@hydra.main`` composes the config."""
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", _run_dir)
    if not OmegaConf.has_resolver("hydra_subdir"):
        OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir)


# --------------------------------------------------------------------------- RNG states
def _random_nodes(transform: Any) -> list[Any]:
    """The albumentations pipeline and its transforms, each with its own generators."""
    nodes, todo = [], [transform]
    while todo:
        node = todo.pop(0)
        if node is None:
            continue
        if hasattr(node, "random_generator") and hasattr(node, "py_random"):
            nodes.append(node)
        todo.extend(getattr(node, "transforms", None) or [])
    return nodes


def _train_transform(trainer: L.Trainer) -> Any:
    loader = getattr(trainer, "train_dataloader", None)
    return getattr(getattr(loader, "dataset", None), "transform", None)


def collect_rng_states(transform: Any = None) -> dict[str, Any]:
    """Every RNG a training step draws from, in a form ``torch.load(weights_only=True)`` reads
    (tensors, ints, tuples; no numpy arrays)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    nodes = _random_nodes(transform)
    if nodes:
        states["albumentations"] = [(n.random_generator.bit_generator.state, n.py_random.getstate())
                                    for n in nodes]
    return states


def set_rng_states(states: dict[str, Any], transform: Any = None) -> None:
    torch.set_rng_state(states["torch"])
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    saved = states.get("albumentations") or []
    nodes = _random_nodes(transform)
    if saved and len(saved) == len(nodes):
        for node, (np_state, py_state) in zip(nodes, saved, strict=True):
            node.random_generator.bit_generator.state = np_state
            node.py_random.setstate(py_state)
    elif saved or nodes:
        log.warning("the training augmentation differs from the checkpoint's (%d vs %d random "
                    "transforms): its generators are not restored", len(nodes), len(saved))


# ---------------------------------------------------------------------------- the callback
class ResumeState(Callback):
    """Stores what a resumed run needs beyond Lightning's checkpoint, and saves ``last.ckpt``
    on SIGTERM.

    Args:
        last_ckpt: the file written when SIGTERM stops ``fit`` (``<run>/checkpoints/last.ckpt``
            in ``conf/callbacks/default.yaml``); ``None``: none.
        every_n_train_steps: also write ``last_ckpt`` after every N training steps (a killed
            run then loses at most N steps; resuming mid-epoch is seeded but not bitwise-equal
            to an uninterrupted run). ``None``: only at epoch ends (the ``last`` checkpoint
            callback) and on SIGTERM.
        seed: the run's seed, stored so a resumed ``seed=null`` run keeps its drawn seed
            (``train.py`` sets it to the seed it used).

    The RNG states are put back at ``on_train_start``, after the sanity check and the other
    callbacks' ``on_fit_start`` (which draw from them), right before the first epoch of the
    resumed run, where the uninterrupted run had them when it saved. In DDP every rank's states
    are gathered and each rank gets its own back.
    """

    def __init__(self, last_ckpt: str | None, every_n_train_steps: int | None,
                 seed: int | None = None) -> None:
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int)
                                                or every_n_train_steps < 1):
            raise ValueError(f"callbacks.every_n_train_steps={every_n_train_steps!r} "
                             "must be an integer >= 1 or null")
        self.last_ckpt = last_ckpt
        self.every_n_train_steps = every_n_train_steps
        self.seed = seed
        self.history: list[dict[str, Any]] = []  # one entry per resume, oldest first
        self._pending: dict[str, Any] | None = None  # restored states not yet applied

    # ------------------------------------------------------------------------------ save
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._pending is not None:  # saved before the restored states were applied
            rng = self._pending.get("rng")
        else:
            mine = collect_rng_states(_train_transform(trainer))
            rng = _gather(trainer, mine)
        state: dict[str, Any] = {"rng": rng, "seed": self.seed, "history": list(self.history)}
        for name in RUNNING_BEST:
            best = getattr(pl_module, name, None)
            if best is not None:
                state[name] = {"states": {k: v.detach().cpu() for k, v in
                                          best.metric_state.items()},
                               "update_count": int(best._update_count)}
        ineligible = getattr(pl_module, "ineligible_epochs", None)
        if ineligible is not None:
            state["ineligible_epochs"] = {int(k): str(v) for k, v in ineligible.items()}
        checkpoint[CKPT_KEY] = state

    # ------------------------------------------------------------------------------ load
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CKPT_KEY)
        if trainer.state.fn != TrainerFn.FITTING or not state:
            return
        self.history = list(state.get("history") or [])
        self.history.append({"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "epoch": checkpoint.get("epoch"),
                             "global_step": checkpoint.get("global_step"),
                             "ckpt_path": str(trainer.ckpt_path)})
        self._pending = state
        self._apply_module_state(pl_module)

    def _apply_module_state(self, pl_module: L.LightningModule) -> None:
        state = self._pending or {}
        for name in RUNNING_BEST:
            best = getattr(pl_module, name, None)
            if best is not None and name in state:
                for key, value in state[name]["states"].items():
                    setattr(best, key, value.to(pl_module.device))
                best._update_count = state[name]["update_count"]
                best._computed = None
        ineligible = getattr(pl_module, "ineligible_epochs", None)
        if ineligible is not None and "ineligible_epochs" in state:
            ineligible.update(state["ineligible_epochs"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        self._apply_module_state(pl_module)  # again: a sanity check resets the best score
        rng = self._pending.get("rng")
        if rng:
            per_rank = rng if isinstance(rng, list) else [rng]
            mine = per_rank[trainer.global_rank] if trainer.global_rank < len(per_rank) \
                else per_rank[0]
            if len(per_rank) != trainer.world_size:
                log.warning("checkpoint has RNG states of %d rank(s), this run has %d: ranks "
                            "without their own take rank 0's", len(per_rank), trainer.world_size)
            set_rng_states(mine, _train_transform(trainer))
            # The first epoch of a fit made its loader iterator before on_train_start (in
            # FitLoop.setup_data), drawing its base seed from the RNG as it was then. The
            # uninterrupted run makes that epoch's iterator from the states just restored:
            # make it again, so the base seed and the shuffle are drawn from them too.
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)
            else:
                log.warning("resume: no training data fetcher to restart; the first resumed "
                            "epoch's shuffle may differ from the uninterrupted run's")
        self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any
                           ) -> None:
        n = self.every_n_train_steps
        if n and self.last_ckpt and trainer.global_step % n == 0 and \
                not trainer.received_sigterm:  # on SIGTERM: on_exception writes it
            trainer.save_checkpoint(self.last_ckpt)

    # --------------------------------------------------------------------------- SIGTERM
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not self.last_ckpt:
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return  # testing after fit: last.ckpt already holds the finished training
        trainer.save_checkpoint(self.last_ckpt)
        log.info("SIGTERM: saved %s (epoch %d, step %d)", self.last_ckpt,
                 trainer.current_epoch, trainer.global_step)


def _gather(trainer: L.Trainer, states: dict[str, Any]) -> dict[str, Any] | list[dict]:
    """Rank 0 writes the checkpoint: under DDP it gets every rank's states (a list)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        out: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(out, states)
        return out
    return states


# ------------------------------------------------------------------------ atomic writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.tmp-<pid>`` in the checkpoint's own folder, flush, fsync,
    ``os.replace`` over the target, fsync the folder. Lightning's own save writes through an
    fsspec transaction whose temporary file is in the system temp folder, so its final move
    can be a copy across file systems, and nothing is fsynced. Remote paths go to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------- the CSV log on resume
def _csv_loggers(loggers: list[Any]) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    return [lg for lg in loggers if isinstance(lg, CSVLogger)]


def read_csv_rows(loggers: list[Any], global_step: int) -> dict[int, list[dict[str, str]]]:
    """Before a resumed run's CSV logger starts (Lightning's CSV writer deletes an existing
    ``metrics.csv``): the rows each one wrote before the checkpoint (``step < global_step``;
    later rows, from past the checkpoint of a killed run, are logged again)."""
    import csv

    kept: dict[int, list[dict[str, str]]] = {}
    for i, lg in enumerate(_csv_loggers(loggers)):
        path = Path(lg.log_dir) / "metrics.csv"
        if path.is_file():
            with open(path, newline="") as f:
                kept[i] = [r for r in csv.DictReader(f)
                           if r.get("step", "") != "" and float(r["step"]) < global_step]
    return kept


def restore_csv_rows(loggers: list[Any], kept: dict[int, list[dict[str, str]]]) -> None:
    """Put the rows of :func:`read_csv_rows` in front of what each CSV logger writes next."""
    for i, lg in enumerate(_csv_loggers(loggers)):
        if kept.get(i):
            lg.experiment.metrics[:0] = kept[i]


def resume_target(cfg: DictConfig, out_dir: Path) -> tuple[str | None, bool]:
    """The checkpoint file that ``ckpt_path`` names (``last``, a run folder or a file), and
    whether the run continues in that checkpoint's own run folder (``out_dir`` is it: Hydra
    put the job there, conf/hydra/train.yaml)."""
    raw = cfg.get("ckpt_path")
    if raw is None or str(raw) == "":
        return None, False
    runs = Path(cfg.paths.log_dir) / str(cfg.get("task_name")) / "runs"
    path, run = find_checkpoint(raw, runs)
    if path is None:
        if str(raw) == "last":
            raise ConfigError(f"ckpt_path=last: no run folder under {runs} has "
                              f"checkpoints/{LAST}")
        raise ConfigError(f"ckpt_path={raw!r} is a folder without checkpoints/{LAST}")
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
    state = ckpt.get(CKPT_KEY) or {}
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


@contextmanager
def stop_on_sigterm(trainer: L.Trainer, out_dir: Path, state_cb: Any) -> Iterator[None]:
    """Lightning ends ``fit``/``test`` with ``SIGTERMException`` (a ``SystemExit`` of code 0)
    after the batch that SIGTERM interrupted; :class:`ResumeState` has written ``last.ckpt``.
    This turns it into :class:`TrainingInterrupted` with one line that says so."""
    try:
        with lightning_handles_sigterm():
            yield
    except SIGTERMException:
        stage = "testing" if trainer.state.fn == "test" else "training"
        saved = getattr(state_cb, "last_ckpt", None)
        where = (f"saved {saved}; resume with: python train.py ckpt_path={out_dir}"
                 if stage == "training" and saved and Path(saved).is_file()
                 else "no checkpoint written (no resume callback)" if stage == "training"
                 else f"training had finished; test again with: python train.py "
                      f"ckpt_path={out_dir}")
        raise TrainingInterrupted(
            f"stopped by SIGTERM while {stage} (epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}); {where}") from None
