"""Build the defense table of docs/results.md from one Hydra multirun directory.

    python docs/results_table.py logs/skin_cancer/multiruns/<time> [--steps 20] [--limit N]

For every job of the multirun it reads ``metrics.json`` (clean test metrics, wall time), runs
``evaluate.evaluate`` on the best checkpoint with PGD-``steps`` at the training eps and at half
of it, and prints one markdown row per defense: clean balanced accuracy, clean accuracy,
balanced accuracy under PGD at eps and eps/2, the training wall time, and which checkpoint was
tested (the defense's selection criterion and its epoch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from evaluate import evaluate
from lightning_modules.core.config import register_resolvers
from lightning_modules.core.threat import format_eps

ROOT = Path(__file__).resolve().parents[1]


def evaluate_run(run_dir: Path, steps: int, limit: int | None) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    eps = float(metrics["threat"]["eps"])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"ckpt_path={metrics['best_checkpoint']}",
            f"eps_grid=[{eps / 2!r},{eps!r}]",
            "~attacks.fgsm",
            f"attacks.pgd.steps={steps}",
        ])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir / "eval")
        cfg.trainer.limit_test_batches = limit
        cfg.trainer.enable_progress_bar = False
    report = evaluate(cfg)
    by_eps = {round(r["eps"], 8): r for r in report["results"]}
    return {
        "defense": metrics["defense"]["defense"],
        "eps": eps,
        "clean_bal_acc": report["clean"]["bal_acc"],
        "clean_acc": report["clean"]["acc"],
        "adv_bal_acc": by_eps[round(eps, 8)]["bal_acc"],
        "adv_bal_acc_half": by_eps[round(eps / 2, 8)]["bal_acc"],
        "wall_time_s": metrics["wall_time_s"],
        "criterion": metrics.get("selection", {}).get("criterion", "robust"),
        "epoch": report["epoch"],
        "fallback": metrics.get("selection", {}).get("fallback", False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="evaluate N batches only")
    args = parser.parse_args()
    register_resolvers()
    runs = sorted((p.parent for p in args.multirun_dir.glob("*/metrics.json")),
                  key=lambda p: int(p.name) if p.name.isdigit() else p.name)
    if not runs:
        raise SystemExit(f"no */metrics.json under {args.multirun_dir}")
    rows = [evaluate_run(r, args.steps, args.limit) for r in runs]
    eps = format_eps(rows[0]["eps"])
    half = format_eps(rows[0]["eps"] / 2)
    print(f"| defense | selected by | epoch | clean bal. acc | clean acc | PGD-{args.steps} bal. acc "
          f"@ {eps} | PGD-{args.steps} bal. acc @ {half} | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        crit = r["criterion"] + (" (none eligible: last)" if r["fallback"] else "")
        print(f"| {r['defense']} | {crit} | {r['epoch']} | {r['clean_bal_acc']:.4f} | "
              f"{r['clean_acc']:.4f} | {r['adv_bal_acc']:.4f} | {r['adv_bal_acc_half']:.4f} | "
              f"{r['wall_time_s']:.0f} s |")
    (args.multirun_dir / "results_table.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
