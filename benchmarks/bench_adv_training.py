"""Adversarial-training throughput: the project's step against the usual ways of doing it.

    python benchmarks/bench_adv_training.py            # small CNN and ResNet-18, 3x64x64, batch 64
    python benchmarks/bench_adv_training.py --quick    # about a minute (small CNN, 32x32)

Everything runs in one process, on the same model, batch and data, fp32. Each way is timed as
the median of ``--repeats`` runs after ``--warmup`` runs, the repeats taken round-robin over
all ways (so drifts of the machine hit every way alike); the table gives images/s and the ratio
to the naive loop, to torchattacks (if installed: ``pip install --no-deps torchattacks``) and to
the ideal for this machine, measured here as ``K x (forward + input-only backward) + one
training step``. Ways:

- clean step (Lightning): ``RobustClassifier`` with ``defense=none`` through ``Trainer.fit``;
- project PGD-K AT (Lightning): ``RobustClassifier`` with ``pgd_at`` through ``Trainer.fit``;
- project PGD-K AT (raw): the same defense, backward and optimizer step in a plain loop;
- naive loop: model in train mode, ``loss.backward()`` at every attack step (parameter grads too);
- torchattacks PGD + step;
- one step of each other defense (raw loop), and PGD-20 evaluation (attack + forward).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_modules.attacks import attack_from_config
from lightning_modules.defenses import (
    TRADES,
    AdversarialTraining,
    MisclassificationAwareAT,
    MPAdvT,
    NoDefense,
)
from lightning_modules.models.backbones import small_cnn, timm_model


def timed(fn: Callable[[], None]) -> Callable[[], float]:
    """``fn`` as a way that returns its own wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def interleaved(ways: dict[str, Callable[[], float]], warmup: int, repeats: int
                ) -> dict[str, float]:
    """Median seconds of each way. Every way is warmed up first, then the repeats go round-robin
    (one run of each way per round), so slow drifts of the machine (clocks, other load) hit all
    ways alike instead of whichever happened to run during them."""
    for fn in ways.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for k, fn in ways.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def make_model(name: str, num_classes: int, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = small_cnn(num_classes) if name == "small_cnn" else timm_model(name, num_classes)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net.train()


def raw_step(net, opt, defense) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(x, y):
        out = defense(net, x, y, "multiclass")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return step


def naive_pgd_step(net, opt, eps, steps) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The common hand-written loop: train mode, full backward (weights too) at each step."""
    alpha = 2.5 * eps / steps

    def step(x, y):
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(net(x_adv), y)
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                x_adv = x_adv + alpha * x_adv.grad.sign()
                x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
        opt.zero_grad()
        F.cross_entropy(net(x_adv), y).backward()
        opt.step()
    return step


def torchattacks_step(net, opt, eps, steps):
    try:
        import torchattacks
    except ImportError:
        return None
    atk = torchattacks.PGD(net, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    atk.set_model_training_mode(model_training=False, batchnorm_training=False)

    def step(x, y):
        x_adv = atk(x, y)
        net.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x_adv), y).backward()
        opt.step()
    return step


def ideal_ways(net, opt, x, y) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward + input-only backward with frozen params, one clean training step)."""
    def fwd_bwd():
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        try:
            xi = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(net(xi), y, reduction="sum"), xi)
        finally:
            for p in net.parameters():
                p.requires_grad_(True)
            net.train()

    def train_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return fwd_bwd, train_step


def lightning_way(net, defense, x, y, channels_last=False) -> Callable[[], float]:
    """One training batch through ``Trainer.fit`` per call, timed from the batch-start to the
    batch-end hook (Trainer construction and fit set-up are not timed)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_modules.training.module import RobustClassifier

    class Timer(L.Callback):
        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.last = time.perf_counter() - self.t0

    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0], shuffle=False)
    module = RobustClassifier(
        net, defense, attack_from_config("pgd", eps=8 / 255, steps=1), task="multiclass", num_classes=int(y.max()) + 1,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9), scheduler=None,
        train_clean_metrics=False, class_names=None, eps_warmup_epochs=0, class_weights=None,
        channels_last=channels_last, compile=False,
        eligibility={"max_class_share": 0.95, "min_above_chance": 0.02},
    )
    timer = Timer()

    def run() -> float:
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[timer], inference_mode=False)
        trainer.fit(module, train_dataloaders=loader)
        return timer.last
    return run


def bench_model(name: str, args) -> list[tuple[str, float]]:
    eps, steps, bs = 8 / 255, args.steps, args.batch
    torch.manual_seed(0)
    x = torch.rand(bs, 3, args.size, args.size)
    y = torch.randint(0, 7, (bs,))
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fresh(channels_last=False):
        net = make_model(name, 7, channels_last)
        return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def pgd_at():
        return AdversarialTraining(attacks={"pgd": attack_from_config("pgd", eps=eps, steps=steps, model_mode="eval")}, weights=None, clean_weight=0.0, name="adversarial_training")

    ways: dict[str, Callable[[], float]] = {}
    for cl, xx in ((False, x), (True, x_cl)):
        tag = " CL" if cl else ""
        net, opt = fresh(cl)
        fwd_bwd, train_step = ideal_ways(net, opt, xx, y)
        ways[f"_fwd_bwd{tag}"] = timed(fwd_bwd)
        ways[f"clean step (raw){tag}"] = timed(train_step)
        ways[f"clean step (Lightning){tag}"] = lightning_way(fresh()[0], NoDefense(name="none"), x, y, cl)
        ways[f"project PGD-{steps} AT (Lightning){tag}"] = lightning_way(
            fresh()[0], pgd_at(), x, y, cl)
        net, opt = fresh(cl)
        raw = raw_step(net, opt, pgd_at())
        ways[f"project PGD-{steps} AT (raw){tag}"] = timed(lambda raw=raw, xx=xx: raw(xx, y))
    net, opt = fresh()
    naive = naive_pgd_step(net, opt, eps, steps)
    ways[f"naive PGD-{steps} loop"] = timed(lambda: naive(x, y))
    net, opt = fresh()
    ta = torchattacks_step(net, opt, eps, steps)
    if ta is not None:
        ways[f"torchattacks PGD-{steps} + step"] = timed(lambda: ta(x, y))
    if not args.quick:
        others = {
            "fgsm_at": AdversarialTraining(attacks={"fgsm": attack_from_config("fgsm", eps=eps)}, weights={"fgsm": 0.5}, clean_weight=0.5, name="adversarial_training"),
            "fast_at": AdversarialTraining(attacks={"rs": attack_from_config("pgd", eps=eps, steps=1, step_size_rel=1.25)}, weights=None, clean_weight=0.0, name="adversarial_training"),
            "n_fgsm": AdversarialTraining(attacks={"n": attack_from_config("n_fgsm", eps=eps, model_mode="eval")}, weights=None, clean_weight=0.0, name="adversarial_training"),
            f"trades (K={steps})": TRADES(attack=attack_from_config("pgd", eps=eps, steps=steps, random_start="normal"), beta=6.0, name="trades"),
            f"mart (K={steps})": MisclassificationAwareAT(attack=attack_from_config("pgd", eps=eps, steps=steps), beta=6.0, name="mart"),
            "mpadvt (per_sample)": MPAdvT(attack=attack_from_config("pgd", eps=eps, model_mode="train"), levels=[{"eps": eps / 8, "steps": 2},
                                           {"eps": eps / 4, "steps": 3},
                                           {"eps": eps / 2, "steps": 5},
                                           {"eps": eps, "steps": steps}], mode="per_sample", probs=None, clean_weight=0.0, p_adv=0.5, eps_min=0.0, eps_max=None, steps_max=None, step_size=1 / 255, name="mpadvt"),
        }
        for label, defense in others.items():
            net, opt = fresh(True)
            step = raw_step(net, opt, defense)
            ways[f"defense {label} (raw) CL"] = timed(lambda s=step: s(x_cl, y))
    for cl, xx in ((False, x), (True, x_cl)):
        net, _ = fresh(cl)
        net.eval()
        pgd20 = attack_from_config("pgd", eps=eps, steps=20)

        def eval_step(net=net, xx=xx, pgd20=pgd20):
            with torch.no_grad():
                net(pgd20(net, xx, y))

        ways[f"PGD-20 evaluation (attack + forward){' CL' if cl else ''}"] = timed(eval_step)

    # Warm the process up (thread pools, allocator, CPU clocks) before anything is timed.
    net, opt = fresh()
    warm = raw_step(net, opt, pgd_at())
    for _ in range(2):
        warm(x, y)
    t = interleaved(ways, args.warmup, args.repeats)
    ideal = {tag: steps * t[f"_fwd_bwd{tag}"] + t[f"clean step (raw){tag}"] for tag in ("", " CL")}
    best = min(ideal, key=ideal.get)
    rows = [(f"ideal (K fwd+input-bwd + 1 step){best}", ideal[best])]
    rows += [(k, v) for k, v in t.items() if not k.startswith("_")]
    return rows


def report(name: str, rows: list[tuple[str, float]], batch: int) -> None:
    t = dict(rows)
    ideal = next(v for k, v in rows if k.startswith("ideal"))
    naive = next(v for k, v in rows if k.startswith("naive"))
    ta = next((v for k, v in rows if k.startswith("torchattacks")), None)
    print(f"\n## {name}: batch {batch}")
    head = f"| {'way':<40} | {'images/s':>9} | {'vs naive':>8} | {'vs torchattacks':>15} | {'vs ideal':>8} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for label, sec in rows:
        ta_ratio = f"{ta / sec:.2f}x" if ta else "-"
        print(f"| {label:<40} | {batch / sec:>9.1f} | {naive / sec:>7.2f}x | {ta_ratio:>15} | "
              f"{ideal / sec:>7.2f}x |")
    for tag in ("", " CL"):
        lit = next(v for k, v in t.items() if k.endswith("AT (Lightning)" + tag))
        raw = next(v for k, v in t.items() if k.endswith("AT (raw)" + tag))
        print(f"Lightning overhead on the PGD AT step{tag or ''}: {100 * (lit / raw - 1):+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small CNN only, 32x32, batch 32, 1 warm-up + 3 repeats")
    parser.add_argument("--models", default="small_cnn,resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.models, args.warmup, args.repeats, args.batch, args.size = "small_cnn", 1, 3, 32, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"3x{args.size}x{args.size}, PGD-{args.steps}, eps 8/255; CL = channels_last")
    for name in args.models.split(","):
        report(name, bench_model(name, args), args.batch)


if __name__ == "__main__":
    main()
