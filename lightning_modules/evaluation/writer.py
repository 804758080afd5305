"""The files of one evaluation report: ``report.json`` (the :class:`EvalReport`),
``report.csv``, ``accuracy_vs_eps.png`` and ``report.md`` with a short reading."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning_modules.core.io import write_json
from lightning_modules.evaluation.certify import certify_markdown, plot_certified
from lightning_modules.evaluation.corruptions.benchmark import corruption_markdown
from lightning_modules.evaluation.metrics import absent_classes
from lightning_modules.evaluation.schema import ResultRow

__all__ = ["cost_table", "write_report", "plot_report", "reading", "summary_markdown", "fmt"]


def cost_table(cost: dict[str, dict], n_images: int) -> dict[str, Any]:
    """Per cell its cost and the share of images it was spared (cascade; ``None`` at eps 0,
    where attacks are the identity), and the totals over the cells at eps > 0."""
    real = {name: c for name, c in cost.items() if not name.endswith("@0")}
    cells = {name: {**c, "images_spared": round(1 - c["images_attacked"] / n_images, 4)
                    if n_images and name in real else None} for name, c in cost.items()}
    attacked = sum(c["images_attacked"] for c in real.values())
    return {"per_attack": cells,
            "total_seconds": round(sum(c["seconds"] for c in cost.values()), 2),
            # image passes through the model (counted on it), third-party attacks' included
            "forward_passes": sum(c.get("forward_passes", 0) for c in cost.values()),
            "backward_passes": sum(c.get("backward_passes", 0) for c in cost.values()),
            "images_attacked": attacked,
            "images_spared": round(1 - attacked / (n_images * len(real)), 4)
            if n_images and real else None}


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.csv, accuracy_vs_eps.png and report.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    metric_names = list(report["clean"])
    fields = ["attack", "norm", "eps", "eps_str", "steps", "restarts", "seconds",
              "images_attacked", *metric_names]
    tmp = out_dir / "report.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerow({"attack": "clean", "norm": "", "eps": 0.0, "eps_str": "0", "steps": 0,
                         "restarts": 0, **report["clean"]})
        for row in report["results"]:
            writer.writerow({k: row.get(k) for k in fields})
    tmp.replace(out_dir / "report.csv")
    plot_report(report, out_dir / "accuracy_vs_eps.png")
    if report.get("certify"):
        plot_certified(report["certify"], out_dir / "certified_accuracy.png")
    (out_dir / "report.md").write_text(summary_markdown(report))


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["acc", report["score_metric"]] if report["score_metric"] != "acc" else ["acc"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name in dict.fromkeys(r["attack"] for r in report["results"]):  # with worst
            rows = sorted((r for r in report["results"] if r["attack"] == name),
                          key=lambda r: r["eps"])
            ax.plot([r["eps"] * 255 for r in rows], [r[metric] for r in rows], marker="o",
                    label=name.upper())
        ax.axhline(report["clean"][metric], color="gray", ls="--", lw=1, label="clean")
        ax.set_xlabel("epsilon (x 1/255, L-inf)" if all(
            a["norm"] == "linf" for a in report["attacks"].values()) else "epsilon (x 1/255)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{metric} vs epsilon ({report['split']}, n={report['n_images']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reading(report: dict[str, Any]) -> str:
    """A few plain sentences: what the strongest evaluation left of the clean score, against
    chance, and whether the checks let the numbers stand."""
    score = report["score_metric"]
    clean, chance = report["clean"][score], report["chance"][score]
    rows = [r for r in report["results"] if r["eps"] > 0]
    if not rows:
        return f"Only eps = 0 was evaluated: clean {score} {clean:.4f}."
    top = max(r["eps"] for r in rows)
    at_top = [r for r in rows if r["eps"] == top]
    worst = next((r for r in at_top if ResultRow.from_dict(r).worst), None) or \
        min(at_top, key=lambda r: r[score])
    what = "the per-sample worst case over all attacks" if ResultRow.from_dict(worst).worst \
        else worst["attack"]
    text = (f"Clean {score} is {clean:.4f} (chance {chance:.4f}). Under {what} at "
            f"{worst['eps_str']} it is {worst[score]:.4f}, "
            f"{worst[score] / clean:.0%} of clean." if clean > 0 else "")
    if worst[score] <= chance + 1e-9:
        text += " That is at or below chance: no robustness at this radius."
    bad = [c for c in report.get("checks") or [] if not c["passed"]]
    n_checks = len(report.get("checks") or [])
    text += (f" {len(bad)} of {n_checks} honesty checks FAILED (listed below): read the robust "
             "numbers as upper bounds." if bad else
             f" All {n_checks} honesty checks passed.")
    return text


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _recall(v: float | None) -> str:
    return "absent" if v is None else f"{v:.4f}"


def summary_markdown(report: dict[str, Any]) -> str:
    score = report["score_metric"]
    lines = [
        "# Robustness report",
        "",
        f"- checkpoint: `{report['checkpoint']}` (epoch {report['epoch']})",
        f"- data: `{report['dataset']}`, split `{report['split']}`, {report['n_images']} images"
        + (f" ({report['subset']})" if report.get("subset") else "") + f", task {report['task']}",
        f"- backbone `{report['backbone']}`, defense `{report['defense']}`, trained at "
        f"{report['train_threat']}",
        "- clean: " + ", ".join(f"{k} {v:.4f}" for k, v in report["clean"].items()),
        f"- evaluation `{report.get('evaluation')}`, {report.get('precision')} on "
        f"{report.get('devices')} device(s); software: " + ", ".join(
            f"{k} {v}" for k, v in (report.get("software") or {}).items() if v),
        f"- chance level: {score} {report['chance'][score]:.4f} (a constant predictor)",
        *([f"- **threat model**: {report['threat_model']['note']}"]
          if (report.get("threat_model") or {}).get("note") else []),
        "",
        reading(report),
        "",
        f"| attack | norm | eps | steps | restarts | acc | {score} | images attacked | "
        "seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        steps, restarts, n_att, secs = (r.get(k) if r.get(k) is not None else "-" for k in (
            "steps", "restarts", "images_attacked", "seconds"))
        lines.append(f"| {r['attack']} | {r['norm']} | {r['eps_str']} | {steps} | "
                     f"{restarts} | {r['acc']:.4f} | {r[score]:.4f} | {n_att} | {secs} |")
    if report.get("cascade") and report["cost"]["images_spared"] is not None:
        cost = report["cost"]
        lines += ["", "Cascade (as AutoAttack runs its components): at each radius every attack "
                  "ran only on the images the earlier ones had not fooled, so each row after "
                  "the first is the worst case up to that attack. It spared "
                  f"{cost['images_spared']:.0%} of the attack calls "
                  f"({cost['images_attacked']} images attacked, {cost['total_seconds']} s)."]
    if report.get("cost") and report["cost"].get("forward_passes") is not None:
        cost = report["cost"]
        lines += ["", f"Attack cost: {cost['total_seconds']} s, "
                  f"{cost['forward_passes']:,} forward and {cost['backward_passes']:,} backward "
                  "image passes through the model (counted on it)."]
    for name, why in (report.get("skipped_attacks") or {}).items():
        lines += ["", f"- **skipped** `{name}`: {why}"]
    per_class = [k for k in report["clean"] if "/" in k]
    if per_class:
        strongest = {}
        for r in report["results"]:  # the largest eps of each attack
            if r["eps"] >= strongest.get(r["attack"], {"eps": -1})["eps"]:
                strongest[r["attack"]] = r
        heads = [f"{r['attack']} @ {r['eps_str']}" for r in strongest.values()]
        lines += ["", f"Per class ({per_class[0].split('/')[0]}):", "",
                  "| class | clean | " + " | ".join(heads) + " |",
                  "|---|---|" + "---|" * len(heads)]
        for key in per_class:
            cells = [_recall(report["clean"][key])] + [_recall(r.get(key))
                                                       for r in strongest.values()]
            lines.append(f"| {key.split('/', 1)[1]} | " + " | ".join(cells) + " |")
        absent = absent_classes(report["clean"])
        if absent:
            lines += ["", f"Absent from the evaluated images: {', '.join(absent)}. Balanced "
                      "accuracy is the mean recall over the classes present (as scikit-learn's "
                      "`balanced_accuracy_score`); an absent class is shown as absent, not 0."]
    checks = report.get("checks") or []
    if checks:
        lines += ["", "Honesty checks (AutoAttack's flags, Carlini et al. 2019):", ""]
        lines += [f"- {'ok' if c['passed'] else '**FAILED**'} {c['check']}: {c['detail']}"
                  for c in checks]
    lines += ["", "![accuracy vs epsilon](accuracy_vs_eps.png)", ""]
    ana = report.get("analyses") or {}
    if ana.get("files"):
        lines += [f"## Analyses (Xu et al. 2021): {ana['n_images']} images, "
                  f"{', '.join(ana['attacks'])} at {ana['eps']}", ""]
        if ana.get("feature_distance"):
            stages = next(iter(ana["feature_distance"].values()))
            lines += ["Relative feature distance ||f(x') - f(x)|| / ||f(x)|| per stage:", "",
                      "| attack | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
            lines += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in d.values()) + " |"
                      for a, d in ana["feature_distance"].items()]
        if ana.get("discriminability"):
            lines += ["", "Penultimate features: silhouette of the classes and a linear "
                      "probe's cross-validated accuracy and balanced accuracy:", "",
                      "| features | silhouette | probe acc | probe bal. acc |",
                      "|---|---|---|---|"]
            lines += [f"| {k} | {fmt(d['silhouette'])} | {fmt(d['probe_acc'])} | "
                      f"{fmt(d.get('probe_bal_acc'))} |"
                      for k, d in ana["discriminability"].items()]
        if "label_correlation" in ana:
            lines += ["", "Frobenius distance of the finding correlation to the ground truth's: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in
                                  ana["label_correlation"]["distance_to_truth"].items())]
        lines += [""] + [f"![{k}](analyses/{f})" for k, f in ana["files"].items()] + [""]
    if report.get("corruptions"):
        lines += corruption_markdown(report["corruptions"], "corruptions")
    if report.get("certify"):
        lines += certify_markdown(report["certify"], report["results"])
    return "\n".join(lines)
