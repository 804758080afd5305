"""The second study's analyses on one set of test images, as numbers and figures (Xu et al.,
Medical Image Analysis 2021): feature distance across depth, t-SNE of penultimate features with
silhouette and linear-probe numbers, confusion matrices (single-label) or label correlation
(multi-label), and a grid of the most confidently fooled examples. Plain PyTorch, NumPy,
scikit-learn and matplotlib; ``evaluate.py`` calls :func:`run_analyses` with
``evaluation.analyses`` (``evaluation=xu2021``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_modules.attacks import GAP, PGD, Attack, attack_mode
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tasks import Task
from lightning_modules.core.threat import format_eps
from lightning_modules.evaluation.analysis.discriminability import discriminability, tsne_2d
from lightning_modules.evaluation.analysis.features import (
    feature_stages,
    penultimate_features,
    relative_feature_distance,
)
from lightning_modules.evaluation.analysis.labels import (
    cooccurrence,
    correlation_distance,
    prediction_correlation,
)

__all__ = ["ANALYSES", "analyses_for_report", "run_analyses"]

#: the analyses by name: feature distance across depth, t-SNE / silhouette / linear probe of
#: penultimate features, confusion matrices (single-label) or label correlation (multi-label),
#: the most confidently fooled examples
log = logging.getLogger(__name__)
ANALYSES = ("features", "discriminability", "labels", "examples")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((k, k), dtype=np.int64)
    np.add.at(out, (y, pred), 1)
    return out


def run_analyses(net: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 num_classes: int, attacks: Mapping[str, Attack], out_dir: Path,
                 class_names: list[str] | None = None, seed: int = 0,
                 tsne_images: int = 300, which: Any = ANALYSES) -> dict[str, Any]:
    """Attack ``(x, y)`` with each attack, write the figures into ``out_dir`` and return the
    numbers: ``feature_distance[attack][stage]``, ``discriminability[clean|attack]``,
    ``confusion`` or ``label_correlation``, and the file names; ``which`` picks a subset of
    :data:`ANALYSES` by name."""
    which = set(which)
    if which - set(ANALYSES):
        raise ValueError(f"unknown analyses {sorted(which - set(ANALYSES))}; choose from "
                         f"{list(ANALYSES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    k = num_classes
    names = class_names or [str(i) for i in range(k)]
    with attack_mode(net, "eval"):
        adv = {name: atk(net, x, y, task) for name, atk in attacks.items()}
        with torch.no_grad():
            logits = {"clean": net(x).float(), **{n: net(a).float() for n, a in adv.items()}}
        result: dict[str, Any] = {"n_images": int(x.shape[0]), "files": {},
                                  "which": [a for a in ANALYSES if a in which]}
        if "features" in which:
            stages = feature_stages(net)
            result["feature_distance"] = {n: relative_feature_distance(net, x, a, stages)
                                          for n, a in adv.items()}
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(x.shape[0], generator=gen)[:tsne_images]
        if "discriminability" in which:
            feats = {"clean": penultimate_features(net, x[pick]),
                     **{n: penultimate_features(net, a[pick]) for n, a in adv.items()}}
    if "features" in which:
        _plot_feature_distance(plt, result, out_dir)
    if "discriminability" in which:
        _plot_tsne(plt, result, feats, y[pick], task, names, k, seed, out_dir)
    if "labels" in which:
        _plot_labels(plt, result, logits, y, task, names, k, out_dir)
    first = next(iter(adv), None)  # the most confidently fooled examples of the first attack
    if "examples" in which and first is not None:
        result["files"]["examples"] = _examples(plt, x, adv[first], y, logits["clean"],
                                                logits[first], task, names, first, out_dir)
    return result


def _plot_feature_distance(plt, result: dict, out_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, dist in result["feature_distance"].items():
        ax.plot(list(dist), list(dist.values()), marker="o", label=n)
    ax.set_ylabel("||f(x') - f(x)|| / ||f(x)||")
    ax.set_xlabel("stage (shallow to deep)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "feature_distance.png", dpi=100)
    plt.close(fig)
    result["files"]["feature_distance"] = "feature_distance.png"


def _plot_tsne(plt, result: dict, feats: dict, y_pick: torch.Tensor, task: Task, names, k: int,
               seed: int, out_dir: Path) -> None:
    """Discriminability of penultimate features (single-label: by true class; multi-label: by
    the first positive finding, "none" as its own group), numbers and t-SNE panels."""
    yp = y_pick.cpu().numpy()
    groups = yp if task.single_label else np.where(yp.any(1), yp.argmax(1), k)
    result["discriminability"] = {n: discriminability(f.cpu().numpy(), groups, seed)
                                  for n, f in feats.items()}
    fig, axes = plt.subplots(1, len(feats), figsize=(4 * len(feats), 4), squeeze=False)
    for ax, (n, f) in zip(axes[0], feats.items(), strict=True):
        emb = tsne_2d(f.cpu().numpy(), seed=seed)
        for g in np.unique(groups):
            sel = groups == g
            ax.scatter(emb[sel, 0], emb[sel, 1], s=6,
                       label=names[g] if g < len(names) else "no finding")
        d = result["discriminability"][n]
        sil = "-" if d["silhouette"] is None else f"{d['silhouette']:.3f}"
        probe = "-" if d.get("probe_bal_acc") is None else f"{d['probe_bal_acc']:.3f}"
        ax.set_title(f"{n}: silhouette {sil}, probe bal. acc {probe}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=6, markerscale=2)
    fig.tight_layout()
    fig.savefig(out_dir / "tsne.png", dpi=100)
    plt.close(fig)
    result["files"]["tsne"] = "tsne.png"


def _plot_labels(plt, result: dict, logits: dict, y: torch.Tensor, task: Task, names, k: int,
                 out_dir: Path) -> None:
    """Confusion matrices (single-label) or finding co-occurrence and correlation."""
    yn = y.cpu().numpy()
    if task.single_label:
        mats = {n: _confusion(yn, lg.argmax(1).cpu().numpy(), k) for n, lg in logits.items()}
        result["confusion"] = {n: m.tolist() for n, m in mats.items()}
        title = "confusion (rows: true, columns: predicted)"
    else:
        preds = {n: (lg > 0).cpu().numpy() for n, lg in logits.items()}
        truth = prediction_correlation(yn)
        corr = {n: prediction_correlation(p) for n, p in preds.items()}
        mats = {"truth": truth, **corr}
        result["label_correlation"] = {
            "cooccurrence": {"truth": cooccurrence(yn).tolist(),
                             **{n: cooccurrence(p).tolist() for n, p in preds.items()}},
            "distance_to_truth": {n: correlation_distance(c, truth) for n, c in corr.items()}}
        title = "Pearson correlation of findings"
    fig, axes = plt.subplots(1, len(mats), figsize=(3.5 * len(mats), 3.5), squeeze=False)
    for ax, (n, m) in zip(axes[0], mats.items(), strict=True):
        ax.imshow(m, cmap="viridis" if task.single_label else "coolwarm",
                  **({} if task.single_label else {"vmin": -1, "vmax": 1}))
        ax.set_title(n, fontsize=9)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names[:k], rotation=90, fontsize=6)
        ax.set_yticklabels(names[:k], fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    name = "confusion.png" if task.single_label else "label_correlation.png"
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    result["files"]["confusion" if task.single_label else "label_correlation"] = name


def _examples(plt, x, x_adv, y, clean, fooled, task: Task, names, attack: str, out_dir: Path,
              n: int = 6) -> str:
    """Clean, adversarial and amplified perturbation with labels, most confident misses first."""
    wrong = task.wrong(fooled, y) & ~task.wrong(clean, y)
    conf = (fooled.softmax(1).amax(1) if task.single_label
            else (fooled.sigmoid() - 0.5).abs().mean(1))
    order = [int(i) for i in torch.argsort(conf.masked_fill(~wrong, -1), descending=True)[:n]
             if wrong[i]]
    fig, axes = plt.subplots(max(1, len(order)), 3, figsize=(7, 2.3 * max(1, len(order))),
                             squeeze=False)

    def label(v):
        if task.single_label:
            return names[int(v)] if int(v) < len(names) else str(int(v))
        return ",".join(names[j] for j in np.flatnonzero(np.asarray(v) > 0)) or "none"

    for row, i in zip(axes, order, strict=False):
        delta = (x_adv[i] - x[i]).float()
        amp = (delta / (2 * delta.abs().max().clamp_min(1e-12)) + 0.5)
        for ax, img in zip(row, (x[i], x_adv[i], amp), strict=True):
            arr = img.float().cpu().permute(1, 2, 0).numpy()
            ax.imshow(arr.squeeze(-1) if arr.shape[-1] == 1 else arr.clip(0, 1),
                      cmap="gray" if arr.shape[-1] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
        pc = clean[i].argmax().item() if task.single_label else (clean[i] > 0).int().tolist()
        pa = fooled[i].argmax().item() if task.single_label else (fooled[i] > 0).int().tolist()
        row[0].set_title(f"true {label(y[i].tolist() if not task.single_label else y[i])}, "
                         f"pred {label(pc)}", fontsize=7)
        row[1].set_title(f"{attack}: pred {label(pa)}", fontsize=7)
        row[2].set_title("perturbation (amplified)", fontsize=7)
    if not order:
        axes[0][0].set_title(f"{attack} fooled no image that was right clean", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "examples.png", dpi=100)
    plt.close(fig)
    return "examples.png"


def analyses_for_report(options: Any, net, datamodule, split: str, task: str, num_classes: int,
                        attacks: dict, eps_grid: list[float], class_names, out_dir: Path,
                        seed: int) -> dict[str, Any]:
    """The second study's analyses (lightning_modules/evaluation/analysis) on a seeded random sample of
    ``evaluation.analysis_images`` images of the split, with the untargeted PGD and GAP
    attacks at the largest radius; figures in ``<output dir>/analyses/``."""
    eps = max(eps_grid)
    chosen = {n: a.with_eps(eps) for n, a in attacks.items()
              if (type(a) is PGD and a.targeted is None) or isinstance(a, GAP)}
    if not chosen or eps == 0:
        log.warning("evaluation.analyses: no untargeted PGD or GAP attack, or eps_grid is all 0")
        return {"skipped": "no untargeted PGD or GAP attack at an eps > 0"}
    n = min(int(options.analysis_images), len(datamodule.datasets[split]))
    x, y = next(iter(datamodule.sample_loader(split, n, n, seed)))
    device = next(net.parameters()).device
    start = time.perf_counter()
    which = options.analyses
    which = ANALYSES if which is True else [which] if isinstance(which, str) else list(which)
    try:
        result = run_analyses(net, x.to(device), y.to(device), Task(task), num_classes, chosen,
                              out_dir / "analyses", class_names,
                              seed=seed, which=which)
    except ValueError as err:
        if "unknown analyses" in str(err):
            raise ConfigError(f"evaluation.analyses: {err}") from err
        raise
    result.update(eps=format_eps(eps), attacks=list(chosen),
                  seconds=round(time.perf_counter() - start, 1))
    return result
