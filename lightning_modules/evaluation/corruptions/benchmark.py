"""Robustness to common corruptions and to perturbation sequences, in plain PyTorch.

- :func:`corruption_scores`: the model's metrics on the images under every corruption of a set
  (``lightning_modules.evaluation.corruptions.images``: MedMNIST-C's sets per domain) at every severity, and clean.
- :func:`summarise`: per corruption the score averaged over severities, its drop from clean
  (absolute and relative), and the mean over all corruptions.
- :func:`corruption_errors` and :func:`mce`: the corruption error of Hendrycks & Dietterich
  (ICLR 2019), ``CE_c = sum_s E_{s,c}(f) / sum_s E_{s,c}(baseline)``, its mean over corruptions
  (mCE), and the relative CE, ``sum_s (E_{s,c}(f) - E_clean(f)) / sum_s (E_{s,c}(base) -
  E_clean(base))``. The error is one minus the task's score: the balanced error for
  single-label tasks, as MedMNIST-C normalises it to a reference model, and one minus macro
  AUROC for multi-label ones.
- :func:`flip_rate` and :func:`flip_probability`: the perturbation-sequence test (the
  ImageNet-P idea, used by Xu et al., MedIA 2021): each image becomes a sequence of growing
  perturbation, and the flip probability is the share of consecutive frames whose prediction
  changes (for multi-label, per finding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tasks import SCORE_METRIC
from lightning_modules.evaluation.corruptions.images import (
    CORRUPTION_SETS,
    SEQUENCE_KINDS,
    from_uint8,
    get_set,
    image_rng,
    sequence_frames,
    to_uint8,
)
from lightning_modules.evaluation.metrics import build_metrics, scalar_metrics
from lightning_modules.evaluation.schema import EvalReport

__all__ = ["corruption_benchmark", "corruption_errors", "corruption_markdown", "corruption_scores", "flip_probability", "flip_rate", "mce",
           "plot_corruptions", "summarise"]

log = logging.getLogger(__name__)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _predict(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(net.parameters()).device
    with torch.no_grad():
        return net(x.to(device)).float().cpu()


def corruption_scores(net: nn.Module, batches: Batches, task: str, num_classes: int,
                      set_name: str, severities: Sequence[int] = (1, 2, 3, 4, 5),
                      seed: int = 0) -> dict[str, Any]:
    """Metrics (``lightning_modules.evaluation.metrics``) clean and under each corruption of ``set_name``
    at each severity, over ``batches`` of ``(x, y)`` with ``x`` in [0, 1]. Image ``i`` of the
    stream is corrupted with the generator ``image_rng(seed, i, corruption)``, so the
    numbers do not depend on the batch size. The clean images are scored after the same uint8
    round trip (``to_uint8`` then ``from_uint8``) as the corrupted ones, so a corruption that
    changes nothing scores exactly the clean score. Returns ``{"clean": {...}, "table":
    {corruption: {severity: {...}}}, "n_images": N, "unchanged": {corruption: [severities]},
    ...}``: ``unchanged`` lists the corruptions and severities that left every image as it was
    at this image size (e.g. a blur below a pixel), with a warning."""
    cset = get_set(set_name)
    was_training = net.training
    net.eval()
    clean = build_metrics(task, num_classes)
    cells = {(c, s): build_metrics(task, num_classes) for c in cset for s in severities}
    unchanged = {(c, s): 0 for c in cset for s in severities}  # images a corruption left as is
    n = 0
    try:
        for x, y in batches:
            y = y.long() if task == "multilabel" else y  # torchmetrics: integer findings
            imgs = to_uint8(x)
            # the clean reference through the same uint8 round trip as the corrupted images
            clean.update(_predict(net, from_uint8(imgs).to(x.dtype)), y)
            for name, cor in cset.items():
                for s in severities:
                    out = np.stack([cor(img, s, image_rng(seed, n + i, name))
                                    for i, img in enumerate(imgs)])
                    unchanged[name, s] += sum(np.array_equal(o, img)
                                              for o, img in zip(out, imgs, strict=True))
                    cells[name, s].update(_predict(net, from_uint8(out).to(x.dtype)), y)
            n += x.shape[0]
    finally:
        net.train(was_training)
    if n == 0:
        raise ValueError("corruption_scores: no images")
    table: dict[str, dict[str, dict[str, float]]] = {c: {} for c in cset}
    for (c, s), metrics in cells.items():
        table[c][str(s)] = scalar_metrics(metrics.compute())
    same: dict[str, list[int]] = {}
    for (c, s), k in unchanged.items():
        if k == n:
            same.setdefault(c, []).append(int(s))
    if same:
        side = "x".join(str(d) for d in imgs.shape[1:3])
        log.warning("corruptions: at %s px these leave every image unchanged (their scores "
                    "are the clean score): %s", side,
                    ", ".join(f"{c} at severity {', '.join(map(str, v))}"
                              for c, v in same.items()))
    return {"set": set_name, "severities": list(severities), "seed": seed, "n_images": n,
            "score_metric": SCORE_METRIC[task], "error": f"1 - {SCORE_METRIC[task]}",
            "clean": scalar_metrics(clean.compute()), "table": table, "unchanged": same}


def summarise(result: Mapping[str, Any]) -> dict[str, Any]:
    """Per corruption: the score and accuracy averaged over severities, the drop from clean
    and the relative drop (drop / clean score); and the same averaged over corruptions."""
    key = result["score_metric"]
    clean = result["clean"][key]
    per = {}
    for c, by_sev in result["table"].items():
        score = float(np.mean([m[key] for m in by_sev.values()]))
        per[c] = {"score": score, "acc": float(np.mean([m["acc"] for m in by_sev.values()])),
                  "drop": clean - score,
                  "relative_drop": (clean - score) / clean if clean > 0 else None}
    mean = {k: float(np.mean([p[k] for p in per.values()])) for k in ("score", "acc", "drop")}
    mean["relative_drop"] = mean["drop"] / clean if clean > 0 else None
    return {"per_corruption": per, "mean": mean}


def corruption_errors(result: Mapping[str, Any]) -> tuple[dict[str, dict[str, float]], float]:
    """``({corruption: {severity: error}}, clean error)`` with error = 1 - score."""
    key = result["score_metric"]
    errors = {c: {s: 1.0 - m[key] for s, m in by_sev.items()}
              for c, by_sev in result["table"].items()}
    return errors, 1.0 - result["clean"][key]


def mce(errors: Mapping[str, Mapping[str, float]], clean_error: float,
        base_errors: Mapping[str, Mapping[str, float]], base_clean_error: float
        ) -> dict[str, Any]:
    """Corruption error, mCE, relative CE and relative mCE against a baseline (Hendrycks &
    Dietterich, ICLR 2019). Errors by corruption and severity; both models must cover the same
    corruptions and severities. A corruption whose baseline error sums to 0 (or, for the
    relative CE, does not exceed the baseline's clean error) has no CE (``None``) and is left
    out of the mean."""
    if set(errors) != set(base_errors) or any(set(errors[c]) != set(base_errors[c])
                                              for c in errors):
        raise ValueError("mce: the model and the baseline were measured on different "
                         "corruptions or severities")
    ce, rel = {}, {}
    for c in errors:
        e = sum(errors[c].values())
        b = sum(base_errors[c].values())
        ce[c] = e / b if b > 0 else None
        n = len(errors[c])
        db = b - n * base_clean_error
        rel[c] = (e - n * clean_error) / db if db > 0 else None

    def mean(d: dict) -> float | None:
        vals = [v for v in d.values() if v is not None]
        return float(np.mean(vals)) if vals else None

    return {"ce": ce, "mce": mean(ce), "relative_ce": rel, "relative_mce": mean(rel)}


def flip_rate(preds: torch.Tensor) -> float:
    """The share of consecutive frames whose prediction changes. ``preds``: ``(T, N)`` class
    indices or ``(T, N, K)`` binary findings (then per finding)."""
    if preds.shape[0] < 2:
        raise ValueError("flip_rate: a sequence needs at least 2 frames")
    return float((preds[1:] != preds[:-1]).float().mean())


def flip_probability(net: nn.Module, batches: Batches, task: str,
                     kinds: Sequence[str] = tuple(SEQUENCE_KINDS), frames: int = 10,
                     seed: int = 0) -> dict[str, Any]:
    """Flip probability per perturbation kind (:func:`lightning_modules.evaluation.corruptions.images.sequence_frames`)
    and its mean over kinds; predictions are the argmax (single-label) or findings above 0.5
    probability (multi-label)."""
    was_training = net.training
    net.eval()
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    n = 0
    try:
        for x, _ in batches:
            imgs = to_uint8(x)
            for k in kinds:
                seqs = [sequence_frames(img, k, frames, image_rng(seed, n + i, "seq:" + k))
                        for i, img in enumerate(imgs)]
                stack = np.stack([np.stack(s) for s in seqs], axis=1)  # (T, B, H, W, C)
                logits = _predict(net, from_uint8(stack.reshape(-1, *stack.shape[2:]))
                                  .to(x.dtype)).reshape(frames, len(imgs), -1)
                preds[k].append(logits.argmax(-1) if task == "multiclass" else logits > 0)
            n += x.shape[0]
    finally:
        net.train(was_training)
    if n == 0:
        raise ValueError("flip_probability: no images")
    fp = {k: flip_rate(torch.cat(v, dim=1)) for k, v in preds.items()}
    return {"frames": frames, "n_images": n, "kinds": fp, "mean": float(np.mean(list(fp.values())))}


def plot_corruptions(result: Mapping[str, Any], sample: np.ndarray, out_dir: Path,
                     seed: int = 0) -> dict[str, str]:
    """``corruption_scores.png`` (score per corruption and severity, clean first) and
    ``corruption_examples.png`` (one image under each corruption at severities 1, 3, 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    key, table = result["score_metric"], result["table"]
    names, sevs = list(table), [str(s) for s in result["severities"]]
    grid = np.array([[result["clean"][key]] + [table[c][s][key] for s in sevs] for c in names])
    fig, ax = plt.subplots(figsize=(1.0 * len(sevs) + 3, 0.35 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sevs) + 1), ["clean"] + sevs)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=ax, label=key)
    fig.tight_layout()
    fig.savefig(out_dir / "corruption_scores.png", dpi=100)
    plt.close(fig)
    cset = get_set(result["set"])
    shown = [s for s in (1, 3, 5) if s in result["severities"]]
    fig, axes = plt.subplots(len(shown), len(names) + 1,
                             figsize=(1.2 * (len(names) + 1), 1.3 * len(shown)), squeeze=False)
    for r, s in enumerate(shown):
        row = [("clean", sample)] + [(c, cset[c](sample, s, image_rng(seed, 0, c)))
                                     for c in names]
        for j, (title, img) in enumerate(row):
            ax = axes[r][j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title.replace("_", "\n"), fontsize=6)
            if j == 0:
                ax.set_ylabel(f"severity {s}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "corruption_examples.png", dpi=100)
    plt.close(fig)
    return {"corruption_scores": "corruption_scores.png",
            "corruption_examples": "corruption_examples.png"}


def corruption_markdown(block: Mapping[str, Any], folder: str) -> list[str]:
    """The report's section on corruptions: per corruption the score at each severity, its
    mean and drop, CE and relative CE when a baseline was given; the flip probabilities."""
    key, sevs = block["score_metric"], [str(s) for s in block["severities"]]
    base = block.get("baseline") or {}
    clean = block["clean"][key]
    lines = ["## Common corruptions", "",
             f"The {block['set']} set at severities {', '.join(sevs)} on {block['n_images']} "
             f"images (seed {block['seed']}), applied to the uint8 images; {key} clean "
             f"{clean:.4f}, averaged over corruptions and severities "
             f"{block['mean']['score']:.4f} (drop {block['mean']['drop']:.4f}"
             + (f", {block['mean']['relative_drop']:.0%} of clean" if
                block["mean"]["relative_drop"] is not None else "") + ")."]
    if block.get("unchanged"):
        lines[-1] += (" At this image size these left every image unchanged (their score is "
                      "the clean score): " + "; ".join(
                          f"{c} at severity {', '.join(map(str, v))}"
                          for c, v in block["unchanged"].items()) + ".")
    if base:
        lines[-1] += (f" Against the baseline `{base['source']}`: mCE "
                      f"{_num(base.get('mce'))}, relative mCE {_num(base.get('relative_mce'))}"
                      " (errors are 1 - " + key + "; below 1 is more robust than the baseline).")
    heads = [f"s{s}" for s in sevs] + ["mean", "drop"] + (["CE", "rel. CE"] if base else [])
    lines += ["", f"| corruption ({key}) | " + " | ".join(heads) + " |",
              "|---|" + "---|" * len(heads)]
    for c, by_sev in block["table"].items():
        per = block["per_corruption"][c]
        cells = [f"{by_sev[s][key]:.3f}" for s in sevs] + [f"{per['score']:.3f}",
                                                           f"{per['drop']:.3f}"]
        if base:
            cells += [_num(base["ce"].get(c)), _num(base["relative_ce"].get(c))]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    flips = block.get("flip_probability")
    if flips:
        lines += ["", f"Flip probability over perturbation sequences of {flips['frames']} frames "
                  "(share of consecutive frames whose prediction changes): " + ", ".join(
                      f"{k} {v:.4f}" for k, v in flips["kinds"].items())
                  + f"; mean {flips['mean']:.4f}"
                  + (f"; mFP against the baseline {_num(base.get('mfp'))}" if base.get("mfp")
                     is not None else "") + "."]
    lines += [""] + [f"![{k}]({folder}/{f})" for k, f in (block.get("files") or {}).items()]
    return lines + [""]


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def corruption_benchmark(spec: Any, net: nn.Module, set_name: str, datamodule, split: str,
                         task: str, num_classes: int, seed: int, out_dir: Path,
                         load_baseline: Callable[[Path], tuple[str, int, nn.Module]]
                         ) -> dict[str, Any]:
    """The common-perturbation benchmark (``evaluation.corruptions``) on the split (after
    ``subset``), or a seeded random ``images`` of it: scores per corruption and severity,
    their summary, the flip probability of perturbation sequences, and CE / mCE against
    ``baseline`` (a checkpoint, measured here on the same images, or a report.json or report
    folder of one measured on the same images). Figures in ``<output dir>/corruptions/``.

    ``set_name``: a key of :data:`CORRUPTION_SETS` or ``auto`` (resolved by the caller);
    ``datamodule``: set up, with ``sample_loader``; ``load_baseline(path)``: ``(task,
    num_classes, network)`` of a baseline checkpoint."""
    start = time.perf_counter()
    if set_name not in CORRUPTION_SETS:
        raise ConfigError(f"evaluation.corruptions.set={set_name!r} must be auto or one of "
                          f"{sorted(CORRUPTION_SETS)}")
    severities = spec.get("severities")
    if severities is None:
        raise ConfigError("evaluation.corruptions.severities is not set (conf/corruptions)")
    severities = [int(s) for s in severities]
    if not severities or any(not 1 <= s <= 5 for s in severities):
        raise ConfigError(f"evaluation.corruptions.severities={severities} must be a non-empty "
                          "list of severities in 1..5")
    loader = datamodule.sample_loader(split, int(spec.batch_size), spec.get("images"), seed)
    if len(loader.dataset) == 0:
        raise ConfigError(f"evaluation.corruptions: the {split} split is empty")
    kinds = list(spec.get("sequences") or [])
    frames = int(spec.frames)

    def measure(model) -> tuple[dict, dict | None]:
        scores = corruption_scores(model, loader, task, num_classes, set_name, severities, seed)
        flips = flip_probability(model, loader, task, kinds, frames, seed) if kinds else None
        return scores, flips

    result, flips = measure(net)
    result.update(summarise(result))
    result["flip_probability"] = flips
    baseline = spec.get("baseline")
    if baseline:
        base, base_flips = corruption_baseline(str(baseline), result, measure, task,
                                               num_classes, load_baseline,
                                               next(net.parameters()).device)
        errors, clean_err = corruption_errors(result)
        base_errors, base_clean_err = corruption_errors(base)
        result["baseline"] = {"source": str(baseline), "clean": base["clean"],
                              **mce(errors, clean_err, base_errors, base_clean_err)}
        if flips and base_flips:
            rel = {k: v / base_flips["kinds"][k] if base_flips["kinds"].get(k) else None
                   for k, v in flips["kinds"].items()}
            vals = [v for v in rel.values() if v is not None]
            result["baseline"].update(relative_fp=rel,
                                      mfp=float(np.mean(vals)) if vals else None)
    sample = next(iter(DataLoader(loader.dataset, batch_size=1,
                                  collate_fn=loader.collate_fn)))[0]
    result["files"] = plot_corruptions(result, to_uint8(sample)[0], out_dir / "corruptions",
                                       seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def corruption_baseline(source: str, result: dict, measure, task: str, num_classes: int,
                        load_baseline, device: torch.device) -> tuple[dict, dict | None]:
    """The baseline's corruption scores: measured now for a checkpoint, read for a report."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise ConfigError(f"evaluation.corruptions.baseline={source!r}: no such file")
    if path.suffix == ".json":
        try:
            base = EvalReport.load(path).corruptions
        except (OSError, ValueError) as err:
            raise ConfigError(f"evaluation.corruptions.baseline: {path}: {err}") from err
        if not base:
            raise ConfigError(f"evaluation.corruptions.baseline: {path} has no corruption "
                              "results (evaluate it with evaluation.corruptions set)")
        for key in ("set", "severities", "seed", "n_images"):
            if base.get(key) != result.get(key):
                raise ConfigError(f"evaluation.corruptions.baseline: {path} was measured with "
                                  f"{key}={base.get(key)!r}, this run with {result.get(key)!r}: "
                                  "not the same images and corruptions")
        return base, base.get("flip_probability")
    base_task, base_classes, base_net = load_baseline(path)
    if (base_task, base_classes) != (task, num_classes):
        raise ConfigError(f"evaluation.corruptions.baseline: {path} is a {base_task} model of "
                          f"{base_classes} classes, this one {task} of {num_classes}")
    log.info("corruption baseline: measuring %s on the same images", path)
    return measure(base_net.to(device))
