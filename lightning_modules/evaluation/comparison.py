"""Several checkpoints side by side (``evaluate.py ckpt_path=[...]`` or a multirun folder):
``comparison.{csv,md,png}`` from their :class:`EvalReport` s."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning_modules.evaluation.corruptions.benchmark import corruption_errors, mce
from lightning_modules.evaluation.schema import EvalReport
from lightning_modules.evaluation.writer import fmt

__all__ = ["comparison_rows", "add_corruption_columns", "write_comparison",
           "comparison_analyses"]


def comparison_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint: clean metrics and, per eps > 0, the weakest result over its attacks
    (the worst case when there is one). Each report is read through :class:`EvalReport` (a
    dict that is not one is refused)."""
    reports = [EvalReport.from_dict(r).as_dict() for r in reports]
    rows = []
    for rep in reports:
        score = rep["score_metric"]
        row = {"checkpoint": rep["checkpoint"], "defense": rep["defense"], "epoch": rep["epoch"],
               "n_images": rep["n_images"], "clean_acc": rep["clean"]["acc"],
               f"clean_{score}": rep["clean"][score],
               "failed_checks": sum(not c["passed"] for c in rep["checks"])}
        for r in rep["results"]:
            if r["eps"] == 0:
                continue
            key = f"robust_{score}@{r['eps_str']}"
            row[key] = min(row.get(key, 1.0), r[score])
            key = f"robust_acc@{r['eps_str']}"
            row[key] = min(row.get(key, 1.0), r["acc"])
        rows.append(row)
    add_corruption_columns(rows, reports)
    return rows


def add_corruption_columns(rows: list[dict[str, Any]], reports: list[dict[str, Any]]) -> None:
    """Corruption columns where the reports have them: the mean score over corruptions and
    severities, its drop from clean, the mean flip probability, and mCE / relative mCE against
    the report's own baseline or else against the first checkpoint of the comparison (the
    same images and corruptions; its own mCE is then 1)."""
    with_c = [r for r in reports if r.get("corruptions")]
    ref = with_c[0]["corruptions"] if with_c else None
    for row, rep in zip(rows, reports, strict=True):
        block = rep.get("corruptions")
        if not block:
            continue
        row[f"corrupt_{block['score_metric']}"] = block["mean"]["score"]
        row["corrupt_drop"] = block["mean"]["drop"]
        if block.get("flip_probability"):
            row["flip_prob"] = block["flip_probability"]["mean"]
        base = block.get("baseline")
        if base is None and all(block.get(k) == ref.get(k) for k in
                                ("set", "severities", "seed", "n_images")):
            base = mce(*corruption_errors(block), *corruption_errors(ref))
            row["mce_vs"] = "checkpoint 0"
        elif base is not None:
            row["mce_vs"] = base["source"]
        if base is not None:
            row["mCE"], row["rel_mCE"] = base["mce"], base["relative_mce"]


def write_comparison(rows: list[dict], reports: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    heads = [f for f in fields if f not in ("checkpoint",)]
    lines = ["# Comparison of checkpoints", "",
             "Robust columns: per radius, the lowest result over the attacks that ran (the "
             "per-sample worst case when there were two or more).", "",
             "| # | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for i, r in enumerate(rows):
        cells = [f"{r.get(h):.4f}" if isinstance(r.get(h), float) else str(r.get(h, "-"))
                 for h in heads]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", *[f"{i}. `{r['checkpoint']}`" for i, r in enumerate(rows)], "",
              "![comparison](comparison.png)", ""]
    lines += comparison_analyses(rows, reports, out_dir)
    (out_dir / "comparison.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = reports[0]["score_metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (row, rep) in enumerate(zip(rows, reports, strict=True)):
        eps = sorted({r["eps"] for r in rep["results"]})
        vals = [rep["clean"][score] if e == 0 else
                min(r[score] for r in rep["results"] if r["eps"] == e) for e in eps]
        ax.plot([e * 255 for e in eps], vals, marker="o", label=f"{i}: {row['defense']}")
    ax.set_xlabel("epsilon (x 1/255)")
    ax.set_ylabel(f"{score} (weakest over attacks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=100)
    plt.close(fig)


def comparison_analyses(rows: list[dict], reports: list[dict], out_dir: Path) -> list[str]:
    """Where the reports hold them: the feature distance of every checkpoint and attack in
    one plot (``comparison_features.png``), the discriminability numbers side by side, and
    each corruption's score (mean over severities) per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[str] = []
    names = [f"{i}: {row['defense']}" for i, row in enumerate(rows)]
    ana = [(n, r["analyses"]) for n, r in zip(names, reports, strict=True)
           if (r.get("analyses") or {}).get("feature_distance")]
    if ana:
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, a in ana:
            for attack, dist in a["feature_distance"].items():
                ax.plot(list(dist), list(dist.values()), marker="o", label=f"{n} / {attack}")
        ax.set_xlabel("stage (shallow to deep)")
        ax.set_ylabel("||f(x') - f(x)|| / ||f(x)||")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "comparison_features.png", dpi=100)
        plt.close(fig)
        lines += ["## Analyses", "",
                  "| checkpoint | features | silhouette | probe acc | probe bal. acc |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {k} | {fmt(d['silhouette'])} | {fmt(d['probe_acc'])} | "
                  f"{fmt(d.get('probe_bal_acc'))} |"
                  for n, a in ana for k, d in (a.get("discriminability") or {}).items()]
        lines += ["", "![feature distance](comparison_features.png)", ""]
    cor = [(n, r["corruptions"]) for n, r in zip(names, reports, strict=True)
           if r.get("corruptions")]
    if cor:
        key = cor[0][1]["score_metric"]
        corr_names = list(dict.fromkeys(c for _, b in cor for c in b["per_corruption"]))
        lines += ["## Common corruptions", "",
                  f"{key} per corruption, averaged over severities "
                  f"{cor[0][1]['severities']}:", "",
                  "| corruption | " + " | ".join(n for n, _ in cor) + " |",
                  "|---|" + "---|" * len(cor)]
        lines.append("| clean | " + " | ".join(f"{b['clean'][key]:.3f}" for _, b in cor) + " |")
        lines += [f"| {c} | " + " | ".join(fmt(b["per_corruption"].get(c, {}).get("score"))
                                            for _, b in cor) + " |" for c in corr_names]
        lines.append("| **mean** | " + " | ".join(f"{b['mean']['score']:.3f}" for _, b in cor)
                     + " |")
        lines += [""]
    return lines
