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

from lightning_modules.core.threat import format_eps

__all__ = ["Cell", "EvalReport", "ResultRow", "SCHEMA_VERSION", "WORST", "software_versions"]

SCHEMA_VERSION = 4  # 3: rows name their worst-case group; corruptions and threat blocks typed;
#                     4: the certify block (randomized smoothing)
WORST = "worst"     # the worst-case group of one norm; "worst-<norm>" when several are mounted


@dataclass(frozen=True)
class Cell:
    """One cell of an evaluation grid: an attack (or a worst case) at one radius.

    ``attack`` is the mounted name (``pgd``, ``aa``) or, for a worst case, its group;
    ``group`` is the worst-case group the cell belongs to (``worst`` or ``worst-<norm>``), or
    ``None`` when its radius has no worst case; ``eps`` is in [0, 1] pixel units."""

    attack: str
    norm: str
    eps: float
    group: str | None = None

    @property
    def eps_str(self) -> str:
        return format_eps(self.eps)

    @property
    def key(self) -> str:
        """``<attack>@<eps>``: the name of the cell in the engine and in logged metrics."""
        return f"{self.attack}@{self.eps_str}"

    @property
    def worst(self) -> bool:
        return self.group is not None and self.attack == self.group
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "timm", "pyautoattack",
            "hydra-core", "medrobust")


@dataclass
class ResultRow:
    """One attack at one radius; a worst-case row has ``attack == group``."""

    attack: str
    norm: str
    eps: float                # [0, 1] pixel units
    eps_str: str              # as written: "8/255"
    steps: int | None
    restarts: int | None
    seconds: float | None     # attack time, summed over ranks (None for the worst case)
    images_attacked: int | None
    group: str | None = None  # the worst-case group of this radius (Cell.group)
    metrics: dict[str, float] = field(default_factory=dict)  # acc, bal_acc, fooling_rate, ...

    @property
    def worst(self) -> bool:
        return self.group is not None and self.attack == self.group

    @classmethod
    def from_cell(cls, cell: Cell, metrics: dict[str, float], cost: dict[str, Any] | None,
                  attack: dict[str, Any] | None) -> ResultRow:
        """The row of ``cell`` (``attack``: its attack's ``describe()``, ``None`` for a worst
        case), with its metrics and its cost (seconds, images attacked)."""
        cost = cost or {}
        return cls(attack=cell.attack, norm=cell.norm, eps=cell.eps, eps_str=cell.eps_str,
                   steps=(attack or {}).get("steps"), restarts=(attack or {}).get("restarts"),
                   seconds=cost.get("seconds"), images_attacked=cost.get("images_attacked"),
                   group=cell.group, metrics=dict(metrics))

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        return {**out, **self.metrics}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ResultRow:
        names = {f.name for f in fields(cls)} - {"metrics"}
        kwargs = {k: row.get(k) for k in names}
        if "group" not in row and str(row.get("attack", "")).startswith(WORST):
            kwargs["group"] = row["attack"]  # schema 2 rows: the worst case by its name
        return cls(**kwargs, metrics={k: v for k, v in row.items() if k not in names})


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
    threat_model: dict[str, Any]  # {"norm": ..., "eps_grid": ["0", "2/255", ...], "source":
    #                               where norm/eps/grid came from, "note": a norm other than
    #                               the training one, said}
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
    corruptions: dict[str, Any] | None = None  # evaluation.corruptions: the benchmark's block
    certify: dict[str, Any] | None = None  # evaluation.certify: certified accuracy at radii,
    #                                        average radius, abstentions, the smoothed classifier
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
