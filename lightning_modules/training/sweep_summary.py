"""A Hydra callback that summarises a multirun: one row per job, failed jobs included.

Registered in ``conf/hydra/default.yaml``; at the end of ``python train.py -m ...`` it reads every
job folder of the sweep and writes ``summary.csv`` and ``summary.md`` beside them. A job row
holds the overrides that differ between jobs (those common to all are listed once), its status (``ok`` or ``failed``, with the error line ``train.py`` wrote to
``error.txt``), the tested checkpoint's criterion and epoch, clean and robust test metrics
and the wall time.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "summarise_sweep"]

log = logging.getLogger("medrobust.sweep")

COLUMNS = ["job", "overrides", "status", "defense", "selected_by", "epoch", "test/acc",
           "test/adv_acc", "test/bal_acc", "test/adv_bal_acc", "test/auroc", "test/adv_auroc",
           "wall_time_s", "error"]


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _job_row(job_dir: Path, common: set[str]) -> dict[str, Any]:
    own = [o for o in _overrides(job_dir) if o not in common]
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(own)}
    metrics_file, error_file = job_dir / "metrics.json", job_dir / "error.txt"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        sel = m.get("selection") or {}
        row.update(status="ok", defense=(m.get("defense") or {}).get("defense"),
                   selected_by=sel.get("criterion"), epoch=sel.get("epoch"),
                   wall_time_s=m.get("wall_time_s"))
        row.update({k: m.get("test", {}).get(k) for k in COLUMNS if k.startswith("test/")})
    else:
        error = error_file.read_text().strip() if error_file.is_file() else "no metrics.json"
        row.update(status="failed", error=error)
    return row


def summarise_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` for the jobs under ``sweep_dir``; return rows."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()),
                  key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0,
                                 d.name))
    per_job = [set(_overrides(d)) for d in jobs]
    common = set.intersection(*per_job) if per_job else set()
    rows = [_job_row(d, common) for d in jobs]
    columns = [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    with (sweep_dir / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(column: str, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if column == "wall_time_s" else f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = [f"Sweep {sweep_dir}", "", "Common overrides: `" + " ".join(sorted(common)) + "`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    failed = sum(r["status"] == "failed" for r in rows)
    lines += ["", f"{len(rows)} jobs, {failed} failed."]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: :func:`summarise_sweep` at the end of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = summarise_sweep(sweep_dir)
            failed = [r["job"] for r in rows if r["status"] == "failed"]
            log.info("sweep summary: %s (%d jobs, failed: %s)", sweep_dir / "summary.md",
                     len(rows), failed or "none")
