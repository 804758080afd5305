"""Robustness per hour of training: for each defense, with and without weight averaging, the
training wall time (and epochs) to first reach PGD AT's best robust validation score, and the
final robust test score; several seeds; a table and a plot.

    python benchmarks/bench_time_to_robustness.py --dataset ham10000 \\
        --data-dir ../shared/datasets/ham10000 --defenses pgd_at,fgsm_pgi,n_fgsm \\
        --averaging none,ema --seeds 0,1,2 --epochs 6 --out bench_out/ttr_ham
    python benchmarks/bench_time_to_robustness.py --dataset pneumonia \\
        --data-dir ../shared/datasets/kermany_pneumonia/chest_xray ...
    python benchmarks/bench_time_to_robustness.py --report bench_out/ttr_ham

Each run is ``train.py`` in a subprocess (32 px, the small CNN of width 16, the dataset's
experiment config, ``trainer.max_epochs=--epochs``), one after another, seed-major (every
defense of seed 0, then of seed 1, ...) so that a change in machine load falls on all defenses
alike. From its CSV log, per validation: ``time/train_s`` (training wall time without
validation, ``TrainClock``) and ``val/adv_score`` (balanced accuracy under the validation
attack, PGD-10 at the threat radius, on the averaged weights when averaging). The target of a
seed is PGD AT's best ``val/adv_score`` without averaging (same seed); a run reaches it at the
first validation at or above it. The final score is the test robust balanced accuracy of the
checkpoint the run selects (``test/adv_bal_acc``, PGD-10), and with ``--final-eval N`` also
``evaluate.py`` (``evaluation=standard``, the fast default) on N seeded test images.
A collapse is a ``catastrophic overfitting`` warning of the collapse monitor in the run's log.
Runs already finished (``metrics.json`` present) are reused: rerun to extend a sweep.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = {"ham10000": "skin_cancer_ham10000", "pneumonia": "pneumonia_kermany"}


def run_name(defense: str, averaging: str, seed: int) -> str:
    return f"{defense}-{averaging}-s{seed}"


def train(args, defense: str, averaging: str, seed: int) -> Path:
    folder = Path(args.out) / run_name(defense, averaging, seed)
    if (folder / "metrics.json").is_file():
        return folder
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={EXPERIMENT[args.dataset]}",
           f"datamodule.data_dir={args.data_dir}", f"datamodule.image_size={args.image_size}",
           "backbone.width=16", f"defense={defense}", f"defense.averaging={averaging}",
           f"seed={seed}", f"trainer.max_epochs={args.epochs}", "logger=csv",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={folder}", *args.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(folder / "stdout.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{folder.name}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)
    if rc != 0:
        raise SystemExit(f"{folder.name} failed (exit {rc}): see {folder / 'stdout.log'}")
    if args.final_eval:
        ckpt = json.loads((folder / "metrics.json").read_text())["best_checkpoint"]
        with open(folder / "eval.log", "w") as log:
            subprocess.call([sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={ckpt}",
                             f"subset={args.final_eval}", "trainer.enable_progress_bar=false",
                             f"hydra.run.dir={folder / 'eval'}"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return folder


def curve(folder: Path) -> list[tuple[int, float, float]]:
    """``(epoch, time/train_s, val/adv_score)`` per validation of a run."""
    rows = []
    for path in sorted(folder.glob("**/metrics.csv")):
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("time/train_s") and r.get("val/adv_score"):
                    rows.append((int(float(r["epoch"])), float(r["time/train_s"]),
                                 float(r["val/adv_score"])))
    return sorted(set(rows))


def final(folder: Path) -> dict:
    out = {"test_adv_bal_acc": json.loads((folder / "metrics.json").read_text())["test"].get(
        "test/adv_bal_acc")}
    report = next(iter(sorted((folder / "eval").glob("**/report.json"))), None) \
        if (folder / "eval").is_dir() else None
    if report:
        rep = json.loads(report.read_text())
        eps = str((rep.get("train_threat") or {}).get("eps"))
        worst = [r for r in rep.get("results", []) if str(r.get("attack", "")).startswith("worst")
                 and r.get("eps_str") == eps]  # the per-image worst case at the threat radius
        if worst:
            out["fast_default_bal_acc"] = worst[0].get("bal_acc")
    log = (folder / "stdout.log").read_text(errors="replace") if (
        folder / "stdout.log").is_file() else ""
    out["collapse"] = "catastrophic overfitting" in log.lower()
    return out


def report(folder: str, defenses: list[str] | None = None) -> None:
    runs = {}
    for d in sorted(Path(folder).iterdir()):
        if (d / "metrics.json").is_file() and d.name.count("-") >= 2:
            defense, averaging, seed = d.name.rsplit("-", 2)
            runs[(defense, averaging, int(seed[1:]))] = d
    seeds = sorted({s for (_, _, s) in runs})
    targets = {}
    for s in seeds:
        base = runs.get(("pgd_at", "none", s))
        if base:
            c = curve(base)
            best = max(c, key=lambda r: r[2])
            targets[s] = (best[2], best[1], best[0])
    print(f"target per seed (PGD AT without averaging, best val/adv_score, at train s, epoch):"
          f" {targets}")
    print("| defense | averaging | seeds | reached | train s to target (mean) | epochs | "
          "x PGD AT's time to its best | train s, whole run | best val robust | test robust "
          "(PGD-10) | fast default | collapse |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(d, a) for (d, a, _) in runs}, key=lambda k: (k[0] != "pgd_at", k))
    lines = {}
    for defense, averaging in keys:
        if defenses and defense not in defenses:
            continue
        times, epochs, ratios, bests, tests, fasts, collapses, n = [], [], [], [], [], [], 0, 0
        totals = []
        for s in seeds:
            r = runs.get((defense, averaging, s))
            if r is None or s not in targets:
                continue
            n += 1
            c = curve(r)
            lines[(defense, averaging, s)] = c
            hit = next((row for row in c if row[2] >= targets[s][0] - 1e-9), None)
            if hit:
                times.append(hit[1])
                epochs.append(hit[0] + 1)
                ratios.append(hit[1] / targets[s][1])
            bests.append(max(row[2] for row in c))
            totals.append(c[-1][1])
            f = final(r)
            tests.append(f["test_adv_bal_acc"])
            if f.get("fast_default_bal_acc") is not None:
                fasts.append(f["fast_default_bal_acc"])
            collapses += f["collapse"]

        def mean(v, fmt="{:.3f}"):
            if not v:
                return "-"
            sd = f" ± {fmt.format(statistics.stdev(v))}" if len(v) > 1 else ""
            return fmt.format(statistics.mean(v)) + sd

        print(f"| {defense} | {averaging} | {n} | {len(times)}/{n} | {mean(times, '{:.0f}')} | "
              f"{mean(epochs, '{:.1f}')} | {mean(ratios, '{:.2f}')} | {mean(totals, '{:.0f}')} | "
              f"{mean(bests, '{:.4f}')} | "
              f"{mean([t for t in tests if t is not None], '{:.4f}')} | "
              f"{mean(fasts, '{:.4f}')} | {collapses}/{n} |")
    plot(lines, Path(folder) / "time_to_robustness.png")


def plot(lines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = {}
    for (defense, averaging, seed), c in sorted(lines.items()):
        ax = axes[0 if averaging == "none" else 1]
        colour = colours.setdefault(defense, f"C{len(colours)}")
        ax.plot([r[1] for r in c], [r[2] for r in c], marker="o", ms=3, color=colour,
                alpha=0.8, label=defense if seed == min(s for (d, a, s) in lines
                                                        if d == defense) else None)
    for ax, title in zip(axes, ("no weight averaging", "weight averaging (EMA)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("training wall time (s, validation excluded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("robust validation balanced accuracy (PGD-10)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(EXPERIMENT))
    p.add_argument("--data-dir")
    p.add_argument("--defenses", default="pgd_at,fgsm_pgi,n_fgsm")
    p.add_argument("--averaging", default="none,ema")
    p.add_argument("--runs", default=None,
                   help="defense:averaging pairs instead of the product of the two lists, e.g. "
                        "pgd_at:none,fgsm_pgi:none,fgsm_pgi:ema (pgd_at:none, the target, is "
                        "always run)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--final-eval", type=int, default=0, help="evaluate.py subset=N per run")
    p.add_argument("--out", default="bench_out/time_to_robustness")
    p.add_argument("--report", default=None, help="print the table and plot of a folder")
    p.add_argument("extra", nargs="*", help="more train.py overrides")
    args = p.parse_args()
    if args.report:
        report(args.report)
        return
    if not args.dataset or not args.data_dir:
        p.error("--dataset and --data-dir are needed (or --report)")
    if args.runs:
        pairs = [tuple(r.split(":")) for r in args.runs.split(",")]
        if any(len(r) != 2 for r in pairs):
            p.error(f"--runs {args.runs!r}: expected defense:averaging pairs")
    else:
        pairs = [(d, a) for d in args.defenses.split(",") for a in args.averaging.split(",")]
    if ("pgd_at", "none") not in pairs:
        pairs.insert(0, ("pgd_at", "none"))  # the target
    for seed in map(int, args.seeds.split(",")):
        for defense, averaging in pairs:
            train(args, defense, averaging, seed)
    report(args.out)


if __name__ == "__main__":
    main()
