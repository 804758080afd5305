"""The fast default evaluation against AutoAttack standard, per image, on trained checkpoints.

    python benchmarks/bench_fast_eval.py --ckpt <run>/checkpoints/<best>.ckpt --name ham_mart \\
        --n 500 --out bench_out/fast_eval
    python benchmarks/bench_fast_eval.py --ckpt ... --name ham_masked --mask quantize ...
    python benchmarks/bench_fast_eval.py --table bench_out/fast_eval --tuned syn_none,ham_mart

For one checkpoint: a seeded class-stratified sample of ``--n`` test images (as
``evaluate.py subset=N``), attacked at the checkpoint's training threat (norm and eps) by

- **the reference**: AutoAttack standard (``conf/attack/autoattack.yaml``, the authors'
  ``pyautoattack`` run as they run it, every image; components by the number of classes) and,
  for a multi-label checkpoint (where AutoAttack does not apply), our strongest multi-label
  attack: PGD-100 with 5 restarts on the BCE;
- **the default** (``evaluation=standard``): the evaluation engine itself with PGD-20 then the
  fast attack on the images PGD-20 did not fool (cascade), its per-sample worst case. On a
  multi-label checkpoint the default is PGD-20 alone (the fast attack is single-label);
- PGD-20 alone (for the table).

Per image: robust (right clean and under the attack) or not; the JSON written per checkpoint
(``<out>/<name>.json``) keeps the flags, so the images where the two differ can be listed. Time
and forward/backward passes (images through the model, counted on it by
:class:`~lightning_modules.evaluation.passes.PassCounter`) for each. The reference is cached in
that JSON and reused when the checkpoint, images, threat and mask are the same (``--redo`` runs
it again): retuning the default does not rerun AutoAttack. ``--mask quantize`` wraps the network
in a non-differentiable input step (pixels rounded to 16 levels: zero input gradient), a model
with gradient masking built in. One process, fp32, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch
from torch import nn

from lightning_modules.attacks import attack_from_config
from lightning_modules.core.tasks import Task
from lightning_modules.core.threat import format_eps, parse_eps
from lightning_modules.evaluation.engine import RobustEvaluator
from lightning_modules.evaluation.passes import PassCounter


class QuantizedInput(nn.Module):
    """``net(round(x * (levels - 1)) / (levels - 1))``: a non-differentiable input step whose
    input gradient is zero everywhere (gradient masking; Athalye et al., ICML 2018)."""

    def __init__(self, net: nn.Module, levels: int = 16) -> None:
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.levels - 1
        return self.net(torch.round(x * k) / k)


def load(path: str, n: int, seed: int, batch: int, data_dir: str | None):
    """``(net, task, images, labels, threat (norm, eps), what)`` of a checkpoint."""
    from omegaconf import OmegaConf

    from datamodules import complete_stored_config
    from lightning_modules.core.config import instantiate_node, register_resolvers
    from lightning_modules.evaluation.checkpoint import (
        build_network,
        load_checkpoint,
        stored_config,
    )

    register_resolvers()
    ckpt = load_checkpoint(path)
    over = {"eval_batch_size": batch, **({"data_dir": data_dir} if data_dir else {})}
    train_cfg = stored_config(ckpt, OmegaConf.create(over), complete_stored_config)
    datamodule, net = instantiate_node(train_cfg, "datamodule"), build_network(train_cfg, ckpt)
    datamodule.take_subset("test", n, seed)
    xs, ys = [], []
    for x, y in datamodule.test_dataloader():
        xs.append(x)
        ys.append(y)
    threat = OmegaConf.to_container(train_cfg.threat, resolve=True)
    what = {"dataset": train_cfg.datamodule.get("_target_", "").rsplit(".", 1)[-1],
            "defense": (train_cfg.get("defense") or {}).get("name"),
            "image_size": int(train_cfg.datamodule.get("image_size") or xs[0].shape[-1]),
            "task": str(train_cfg.datamodule.task), "epoch": ckpt.get("epoch")}
    return (net.eval(), Task(str(train_cfg.datamodule.task)), torch.cat(xs), torch.cat(ys),
            (str(threat["norm"]), parse_eps(threat["eps"])), what)


class ComponentLog(logging.Handler):
    """Images each AutoAttack component fooled, from ``pyautoattack``'s own DEBUG log."""

    PATTERN = re.compile(r"^([a-z-]+) - \d+/\d+ - (\d+) out of \d+ successfully perturbed")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.fooled: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = self.PATTERN.match(record.getMessage())
        if m:
            self.fooled[m.group(1)] = self.fooled.get(m.group(1), 0) + int(m.group(2))


def _batches(x, y, batch):
    for i in range(0, x.shape[0], batch):
        yield x[i:i + batch], y[i:i + batch]


def run_attack(net, task, x, y, attack, batch) -> dict:
    """One attack on every image: per-image robust flags, seconds, passes."""
    counted, robust, secs = PassCounter(net), [], 0.0
    for xb, yb in _batches(x, y, batch):
        start = time.perf_counter()
        x_adv = attack(counted, xb, yb, task)
        secs += time.perf_counter() - start
        with torch.no_grad():
            clean_ok, adv_ok = ~task.wrong(net(xb), yb), ~task.wrong(net(x_adv), yb)
        robust.append(clean_ok & adv_ok)
    flags = torch.cat(robust)
    return {"acc": float(flags.float().mean()), "robust": flags.int().tolist(),
            "seconds": round(secs, 2), "forward": counted.forward_images,
            "backward": counted.backward_images}


def run_default(net, task, x, y, norm, eps, batch) -> dict:
    """``evaluation=standard`` through the evaluation engine: PGD-20, then the fast attack on
    the images PGD-20 did not fool (single-label), their per-sample worst case."""
    attacks = {"pgd": attack_from_config("pgd_eval", threat=norm, eps=eps)}
    if task.single_label:
        attacks["fast"] = attack_from_config("fast", threat=norm, eps=eps)
    num_classes = int(net(x[:1]).shape[1])
    engine = RobustEvaluator(task.name, num_classes, attacks,
                             worst_case={"worst": list(attacks)} if len(attacks) > 1 else None,
                             cascade=task.single_label and len(attacks) > 1)
    robust, secs, fwd, bwd = [], 0.0, 0, 0
    for xb, yb in _batches(x, y, batch):
        out = engine.attack_batch(net, xb, yb)
        worst = out.worst.get("worst", out.adv["pgd"])
        robust.append(~task.wrong(out.clean, yb) & ~task.wrong(worst, yb))
        secs += sum(out.seconds.values())
        fwd += sum(out.forward.values())
        bwd += sum(out.backward.values())
    flags = torch.cat(robust)
    return {"acc": float(flags.float().mean()), "robust": flags.int().tolist(),
            "seconds": round(secs, 2), "forward": fwd, "backward": bwd,
            "attacks": {k: a.describe() for k, a in attacks.items()}}


def measure(args) -> dict:
    torch.manual_seed(args.seed)
    net, task, x, y, (norm, eps), what = load(args.ckpt, args.n, args.seed, args.batch,
                                              args.data_dir)
    if args.mask == "quantize":
        net = QuantizedInput(net).eval()
    out_path = Path(args.out) / f"{args.name}.json"
    key = {"ckpt": str(Path(args.ckpt).resolve()), "n": int(x.shape[0]), "seed": args.seed,
           "norm": norm, "eps": eps, "mask": args.mask}
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    with torch.no_grad():
        clean_flags = ~task.wrong(net(x), y)
    result = {"name": args.name, **key, "eps_str": format_eps(eps), **what,
              "clean_acc": float(clean_flags.float().mean()), "threads": torch.get_num_threads(),
              "clean": clean_flags.int().tolist(), "labels": y.tolist()}
    if old.get("key") == key and "reference" in old and not args.redo:
        result["reference"] = old["reference"]
        print(f"{args.name}: reference reused from {out_path}", flush=True)
    else:
        if task.single_label:
            ref = attack_from_config("autoattack", threat=norm, eps=eps)
            log = ComponentLog()
            aa_logger = logging.getLogger("auto-attack")
            aa_logger.addHandler(log)
            aa_logger.setLevel(logging.DEBUG)
            try:
                result["reference"] = {"attack": "autoattack standard",
                                       **run_attack(net, task, x, y, ref, args.batch),
                                       "fooled_by_component": log.fooled}
            finally:
                aa_logger.removeHandler(log)
        else:
            ref = attack_from_config("pgd", threat=norm, eps=eps, steps=100, restarts=5)
            result["reference"] = {"attack": "PGD-100 x5 restarts (BCE)",
                                   **run_attack(net, task, x, y, ref, args.batch)}
    result["key"] = key
    result["pgd20"] = run_attack(net, task, x, y,
                                 attack_from_config("pgd_eval", threat=norm, eps=eps), args.batch)
    result["default"] = run_default(net, task, x, y, norm, eps, args.batch)
    ref_r = torch.tensor(result["reference"]["robust"], dtype=torch.bool)
    def_r = torch.tensor(result["default"]["robust"], dtype=torch.bool)
    result["default_robust_reference_not"] = int((def_r & ~ref_r).sum())
    result["reference_robust_default_not"] = int((ref_r & ~def_r).sum())
    result["time_ratio"] = round(result["default"]["seconds"] /
                                 max(result["reference"]["seconds"], 1e-9), 4)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(table_row(result), flush=True)
    return result


HEADER = ("| checkpoint | half | n | clean | PGD-20 | default | reference | default above "
          "(images) | default below | default s | reference s | time ratio | passes fwd/bwd "
          "default | passes fwd/bwd reference |\n|---|---|---|---|---|---|---|---|---|---|---|"
          "---|---|---|")


def table_row(r: dict, half: str = "") -> str:
    d, ref = r["default"], r["reference"]
    return (f"| {r['name']} | {half} | {r['n']} | {r['clean_acc']:.4f} | {r['pgd20']['acc']:.4f}"
            f" | {d['acc']:.4f} | {ref['acc']:.4f} | {r['default_robust_reference_not']} | "
            f"{r['reference_robust_default_not']} | {d['seconds']:.1f} | {ref['seconds']:.1f} | "
            f"{r['time_ratio']:.3f} | {d['forward']:,}/{d['backward']:,} | "
            f"{ref['forward']:,}/{ref['backward']:,} |")


def table(folder: str, tuned: set[str]) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    print(HEADER)
    for r in rows:
        print(table_row(r, "tuning" if r["name"] in tuned else "held out"))
    for half in ("tuning", "held out"):
        sel = [r for r in rows if (r["name"] in tuned) == (half == "tuning")]
        if sel:
            ratio = sum(r["default"]["seconds"] for r in sel) / max(
                1e-9, sum(r["reference"]["seconds"] for r in sel))
            worst = max(r["default_robust_reference_not"] / r["n"] for r in sel)
            print(f"\n{half}: {len(sel)} checkpoints, total time ratio {ratio:.3f}, largest "
                  f"excess of the default over the reference {100 * worst:.2f} points")


def balanced(flags: list[int], labels: list[int]) -> float:
    """Mean recall over the classes present (scikit-learn's ``balanced_accuracy_score``)."""
    f, y = torch.tensor(flags, dtype=torch.float), torch.tensor(labels)
    return float(torch.stack([f[y == c].mean() for c in y.unique()]).mean())


def defense_table(folder: str, names: list[str]) -> None:
    """Balanced accuracy (classes present) per checkpoint: clean, PGD-20, the fast default,
    AutoAttack standard, and the per-image worst case of AutoAttack and PGD-20
    (``evaluation=autoattack``); the ranking is by the last."""
    rows = []
    for name in names:
        p = Path(folder) / f"{name}.json"
        if not p.is_file():
            print(f"{name}: no result in {p}")
            continue
        r = json.loads(p.read_text())
        ref, pgd = r["reference"]["robust"], r["pgd20"]["robust"]
        worst = [a & b for a, b in zip(ref, pgd, strict=True)]
        cols = [balanced(v, r["labels"]) for v in (r["clean"], pgd, r["default"]["robust"], ref,
                                                   worst)]
        rows.append((r, cols))
    print("| defense | n | clean | PGD-20 | fast default | AutoAttack | worst (AA, PGD-20) | "
          "rank | default above AA (images) | AA below PGD-20 by | found by |\n"
          + "|---" * 11 + "|")
    order = sorted(rows, key=lambda rc: -rc[1][4])
    for r, cols in rows:
        drop = cols[1] - cols[3]
        found = ", ".join(f"{k} {v}" for k, v in r["reference"].get("fooled_by_component",
                                                                    {}).items() if v)
        print(f"| {r['defense']} | {r['n']} | " + " | ".join(f"{c:.4f}" for c in cols)
              + f" | {order.index((r, cols)) + 1} | {r['default_robust_reference_not']} | "
              f"{100 * drop:.2f} points | {found} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt")
    parser.add_argument("--name")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data-dir", default=None, help="datamodule.data_dir override")
    parser.add_argument("--mask", choices=["none", "quantize"], default="none")
    parser.add_argument("--out", default="bench_out/fast_eval")
    parser.add_argument("--redo", action="store_true", help="rerun a cached reference")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", default=None, help="print the table of a folder of results")
    parser.add_argument("--tuned", default="", help="checkpoint names the default was tuned on")
    parser.add_argument("--defense-table", default=None,
                        help="comma-separated result names: balanced-accuracy table with ranking "
                             "(needs --out)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        table(args.table, set(filter(None, args.tuned.split(","))))
        return
    if args.defense_table:
        defense_table(args.out, args.defense_table.split(","))
        return
    if not args.ckpt or not args.name:
        parser.error("--ckpt and --name are needed (or --table)")
    measure(args)


if __name__ == "__main__":
    main()
