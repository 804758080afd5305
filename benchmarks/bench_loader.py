"""Does the data path keep up with adversarial training? Loader images/s with and without the cache.

    python benchmarks/bench_loader.py                       # ../shared/datasets/ham10000
    python benchmarks/bench_loader.py --data-dir /data/ham10000 --image-size 128

Times, in one process and on HAM10000 in its official layout:

- the training dataloader of ``HAM10000DataModule`` as configured by default
  (``conf/datamodule/ham10000.yaml``: dermoscopy augmentation, ``num_workers`` 2), decoding
  the JPEGs every epoch;
- the same with ``cache_dir`` (the first run's cache build is timed separately);
- the same with ``preload`` (decoded once into memory);
- what PGD adversarial training consumes: images/s of the project's PGD-K training step
  (``defense=pgd_at``, ``threat.train_steps`` K) on the default backbone at that image size.

Loader figures are medians over ``--repeats`` passes of ``--batches`` batches after the
workers have started and delivered their first batches. Target: loader >= 3x training.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datamodules import from_config
from datamodules.ham10000 import HAM10000DataModule
from lightning_modules.attacks import attack_from_config
from lightning_modules.defenses import AdversarialTraining
from lightning_modules.models.backbones import small_cnn

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(dm: HAM10000DataModule, batches: int, repeats: int) -> float:
    """Median images/s of the train loader over ``repeats`` passes of ``batches`` batches."""
    rates = []
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(2):  # workers up, first batches out
        next(it)
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        for _ in range(batches):
            try:
                x, _y = next(it)
            except StopIteration:
                it = iter(loader)
                x, _y = next(it)
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def training_rate(image_size: int, batch: int, steps: int, eps: float, repeats: int) -> float:
    """Images/s of the project's PGD-K adversarial training step (small CNN, fp32)."""
    torch.manual_seed(0)
    net = small_cnn(7).train().to(memory_format=torch.channels_last)  # the module default
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    defense = AdversarialTraining(attacks={"pgd": attack_from_config("pgd", eps=eps, steps=steps, model_mode="eval")}, weights=None, clean_weight=0.0, name="adversarial_training")
    x = torch.rand(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,))

    def step():
        out = defense(net, x, y, "multiclass")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/datasets/ham10000"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="default of the HAM10000 config")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="PGD steps (threat.train_steps)")
    args = parser.parse_args()
    if not Path(args.data_dir).is_dir():
        raise SystemExit(f"--data-dir {args.data_dir} is not a directory")
    common = {"data_dir": args.data_dir, "image_size": args.image_size,
              "batch_size": args.batch, "num_workers": args.workers}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; HAM10000 at "
          f"{args.image_size}x{args.image_size}, batch {args.batch}, {args.workers} workers, "
          f"dermoscopy augmentation")
    # training first, while no loader worker process exists to compete for the cores
    train = training_rate(args.image_size, args.batch, args.steps, 2 / 255, args.repeats)
    rows = []
    dm = from_config("ham10000", **common)
    dm.setup("fit")
    rows.append(("loader: decode JPEG every epoch", loader_rate(dm, args.batches, args.repeats)))
    cache_dir = tempfile.mkdtemp(prefix="medrobust-bench-cache-")
    try:
        dm = from_config("ham10000", **common, cache_dir=cache_dir)
        t0 = time.perf_counter()
        dm.prepare_data()
        build_s = time.perf_counter() - t0
        dm.setup("fit")
        rows.append(("loader: memory-mapped cache", loader_rate(dm, args.batches, args.repeats)))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    dm = from_config("ham10000", **common, preload=True)
    t0 = time.perf_counter()
    dm.setup("fit")
    preload_s = time.perf_counter() - t0
    rows.append(("loader: preload into memory", loader_rate(dm, args.batches, args.repeats)))
    rows.append((f"consumed by PGD-{args.steps} AT (small CNN)", train))
    print(f"\n| {'way':<42} | {'images/s':>9} | {'vs training':>11} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 13}|")
    for label, rate in rows:
        print(f"| {label:<42} | {rate:>9.1f} | {rate / train:>10.1f}x |")
    n_images = sum(len(v) for v in dm.split_idx.values())
    print(f"\ncache build (first run, all {n_images} images, all splits): {build_s:.1f} s; "
          f"preload of the splits: {preload_s:.1f} s")


if __name__ == "__main__":
    main()
