"""The schema of ``evaluate.py``'s report (``report.json``), RobustBench-like, as dataclasses.

One :class:`EvalReport` per checkpoint: what was evaluated (checkpoint, dataset, model,
defense, split, number of images), the threat model with eps written like ``"2/255"``, clean
metrics, one :class:`ResultRow` per attack and eps (and the per-sample worst case), each
attack's cost, the honesty checks and the software versions. ``report.json`` is
:meth:`EvalReport.as_dict`; :meth:`EvalReport.load` reads one back (comparisons of several
checkpoints). Rows are flat in JSON (``{"attack": ..., "acc": ...}``) and typed here.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["EvalReport", "ResultRow", "SCHEMA_VERSION", "software_versions"]

SCHEMA_VERSION = 2
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "timm", "pyautoattack",
            "hydra-core", "medrobust")


@dataclass
class ResultRow:
    """One attack at one radius (``attack == "worst"``: the per-sample worst case)."""

    attack: str
    norm: str
    eps: float                # [0, 1] pixel units
    eps_str: str              # as written: "8/255"
    steps: int | None
    restarts: int | None
    seconds: float | None     # attack time, summed over ranks (None for the worst case)
    images_attacked: int | None
    metrics: dict[str, float] = field(default_factory=dict)  # acc, bal_acc, fooling_rate, ...

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        return {**out, **self.metrics}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ResultRow:
        names = {f.name for f in fields(cls)} - {"metrics"}
        return cls(**{k: row.get(k) for k in names},
                   metrics={k: v for k, v in row.items() if k not in names})


@dataclass
class EvalReport:
    checkpoint: str
    epoch: int | None
    dataset: str | None
    backbone: str | None
    defense: str | None
    train_threat: dict[str, Any]
    task: str
    num_classes: int
    class_names: list[str] | None
    score_metric: str
    chance: dict[str, float]
    split: str
    n_images: int
    subset: str | None
    threat_model: dict[str, Any]  # {"norm": ..., "eps_grid": ["0", "2/255", ...]}
    evaluation: str | None        # the conf/evaluation preset
    precision: str
    devices: int
    clean: dict[str, float]
    attacks: dict[str, dict]
    skipped_attacks: dict[str, str]
    cascade: bool
    cost: dict[str, Any]
    gap: dict[str, dict] | None
    worst_case: dict[str, list[str]] | None
    results: list[ResultRow]
    checks: list[dict] = field(default_factory=list)
    software: dict[str, str | None] = field(default_factory=dict)
    wall_time_s: float | None = None
    output_dir: str | None = None
    analyses: dict[str, Any] | None = None  # evaluation.analyses: the second study's analyses
    resumed_batches: int = 0      # batches read back from an interrupted run's partial files
    schema_version: int = SCHEMA_VERSION

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["results"] = [r.as_dict() for r in self.results]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data
                         and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"not a medrobust report (schema {SCHEMA_VERSION}): missing "
                             f"{missing}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["results"] = [ResultRow.from_dict(r) for r in data["results"]]
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def software_versions() -> dict[str, str | None]:
    """Python, the packages that decide the numbers, and this code's git commit."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["git_commit"] = _git_commit()
    return out
