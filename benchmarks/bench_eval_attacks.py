"""Evaluation attacks on one model and batch: images/s and robust accuracy.

    python benchmarks/bench_eval_attacks.py                       # a small CNN trained here
    python benchmarks/bench_eval_attacks.py --ckpt <run>/checkpoints/<best>.ckpt --n 64

One process, one model, one batch of test images, fp32. Each way is timed as the median of
``--repeats`` runs after one warm-up, the repeats taken round-robin over the ways (drifts of the
machine hit every way alike). Ways: our PGD-20 (plain, and with early stop for samples already
misclassified), torchattacks' PGD-20 (the reference; ``pip install --no-deps torchattacks``),
and AutoAttack through ``pyautoattack``: APGD-CE alone, and the standard suite as
``conf/attack/autoattack.yaml`` builds it (``--square-queries``, 5000 in the standard suite).
AutoAttack runs each later component only on the samples still robust; the table shows what
that saves against running every component on the whole batch. Last, ``evaluate.py``'s own
cascade (``evaluation=standard``): the evaluation engine with our PGD-20 then AutoAttack and
their worst case, with and without the cascade, interleaved: time, images attacked, worst case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_modules.attacks import attack_from_config
from lightning_modules.evaluation.engine import RobustEvaluator


def _trained_small_cnn(n: int):
    from datamodules.synthetic import make_synthetic
    from lightning_modules.models.backbones import small_cnn

    torch.manual_seed(0)
    x, y = make_synthetic(1024, 4, image_size=32, signal_amplitude=0.04, colour_amplitude=0.17,
                          seed=3)
    model = small_cnn(4, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(4):
        for i in range(0, 1024, 64):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = make_synthetic(n, 4, image_size=32, signal_amplitude=0.04, colour_amplitude=0.17,
                            seed=4)
    return model.eval(), xt, yt, "small CNN w16 trained 4 epochs on the default data, 32 px"


def _from_checkpoint(path: str, n: int):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from datamodules import complete_stored_config
    from lightning_modules.evaluation.checkpoint import (
        build_network,
        load_checkpoint,
        stored_config,
    )

    ckpt = load_checkpoint(path)
    train_cfg = stored_config(ckpt, OmegaConf.create({"eval_batch_size": n}),
                              complete_stored_config)
    datamodule, net = instantiate(train_cfg.datamodule), build_network(train_cfg, ckpt)
    datamodule.setup("test")
    x, y = next(iter(datamodule.test_dataloader()))
    return net.eval(), x[:n], y[:n], f"{path} ({x.shape[-1]} px)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--n", type=int, default=64, help="images in the batch")
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--square-queries", type=int, default=100)
    parser.add_argument("--cascade-only", action="store_true",
                        help="only the table of evaluate.py's cascade")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model, x, y, what = _from_checkpoint(args.ckpt, args.n) if args.ckpt else \
        _trained_small_cnn(args.n)
    if args.cascade_only:
        print(f"{what}; batch {len(x)}, L-inf eps {args.eps}", flush=True)
        cascade_table(model, x, y, attack_from_config("pgd", eps=args.eps).eps, args)
        return
    ours = attack_from_config("pgd", eps=args.eps, steps=20)
    eps = ours.eps
    ways = {
        "our PGD-20": ours,
        "our PGD-20, early stop": ours.replace(early_stop=True),
        "AutoAttack APGD-CE": attack_from_config("autoattack", eps=eps, components=["apgd-ce"]),
        f"AutoAttack standard (Square {args.square_queries} queries)":
            attack_from_config("autoattack", eps=eps, square_queries=args.square_queries),
    }
    try:
        import torchattacks

        ta = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 20, steps=20, random_start=True)
        ways["torchattacks PGD-20"] = lambda m, xx, yy: ta(xx, yy)
    except ImportError:
        print("torchattacks not installed: its row is skipped")
    num_classes = int(model(x[:1]).shape[1])
    components, _ = attack_from_config("autoattack", eps=eps).suite(num_classes)

    def run(fn):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        x_adv = fn(model, x, y)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            acc = (model(x_adv).argmax(1) == y).float().mean().item()
        return dt, acc

    for fn in ways.values():  # warm-up
        run(fn)
    times = {k: [] for k in ways}
    accs = {}
    for _ in range(args.repeats):
        for k, fn in ways.items():
            dt, accs[k] = run(fn)
            times[k].append(dt)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    # what "only still-robust samples" saves: each component alone on the whole batch
    alone = {}
    for comp in components:
        atk = attack_from_config("autoattack", eps=eps, components=[comp], square_queries=args.square_queries)
        alone[comp] = statistics.median(run(atk)[0] for _ in range(args.repeats))
    base = statistics.median(times["our PGD-20"])
    print(f"\n{what}; batch {len(x)}, L-inf eps {args.eps}, clean acc {clean:.4f}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats\n")
    print("| attack | images/s | time vs our PGD-20 | robust acc |")
    print("|---|---|---|---|")
    for k in ways:
        t = statistics.median(times[k])
        print(f"| {k} | {len(x) / t:.1f} | {t / base:.2f}x | {accs[k]:.4f} |")
    suite = statistics.median(times[next(k for k in ways if k.startswith("AutoAttack standard"))])
    print(f"\nAutoAttack standard suite ({', '.join(components)}): {suite:.1f} s; each component "
          f"alone on the whole batch: " + ", ".join(f"{c} {t:.1f} s" for c, t in alone.items())
          + f"; sum {sum(alone.values()):.1f} s (running later components only on the samples "
          f"still robust saves {1 - suite / sum(alone.values()):.0%})")
    cascade_table(model, x, y, eps, args)


def cascade_table(model, x, y, eps: float, args) -> None:
    """The evaluation engine with PGD-20 (early stop) then AutoAttack standard, worst case over
    both, with and without the cascade, interleaved repeats."""
    suite = {"pgd": attack_from_config("pgd", eps=eps, steps=20, early_stop=True),
             "aa": attack_from_config("autoattack", eps=eps, square_queries=args.square_queries)}
    num_classes = int(model(x[:1]).shape[1])
    times: dict[bool, list[float]] = {False: [], True: []}
    last: dict[bool, tuple] = {}
    for rep in range(args.repeats + 1):  # the first round is the warm-up
        for cascade in (False, True):
            ev = RobustEvaluator("multiclass", num_classes, suite,
                                 worst_case={"worst": ["pgd", "aa"]}, cascade=cascade)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            ev.update(model, x, y)
            if rep:
                times[cascade].append(time.perf_counter() - t0)
            last[cascade] = (ev.compute()["worst"]["acc"], ev.cost())
    print("\nevaluate.py's cascade (PGD-20 with early stop, then AutoAttack standard; worst case "
          "over both):\n")
    print("| way | seconds | vs no cascade | images attacked (PGD, AA) | worst-case acc |")
    print("|---|---|---|---|---|")
    base = statistics.median(times[False])
    for cascade in (False, True):
        t = statistics.median(times[cascade])
        acc, cost = last[cascade]
        print(f"| {'cascade' if cascade else 'every attack on every image'} | {t:.1f} | "
              f"{t / base:.2f}x | {cost['pgd']['images_attacked']}, "
              f"{cost['aa']['images_attacked']} | {acc:.4f} |")


if __name__ == "__main__":
    main()
