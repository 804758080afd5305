"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019), in
plain PyTorch.

The smoothed classifier of a base classifier ``f`` is ``g(x) = argmax_c P(f(x + delta) = c)``,
``delta ~ N(0, sigma^2 I)``. Cohen et al.'s Theorem 1: if the top class ``c_A`` has probability
at least ``p_A > 1/2``, then ``g(x + e) = c_A`` for every ``||e||_2 < sigma * Phi^-1(p_A)``.

- :func:`certify` is their CERTIFY: ``n0`` noise draws select ``c_A``, ``n`` fresh draws count
  it, and the one-sided Clopper-Pearson bound at level ``1 - alpha``
  (:func:`lower_confidence_bound`) gives ``p_A``; below 1/2 it abstains, else the radius is
  ``sigma * Phi^-1(p_A)``. The certificate is wrong with probability at most ``alpha``.
- :func:`predict_from_counts` is their PREDICT on counts of fresh draws: the top class, unless a
  two-sided binomial test of the top two counts cannot reject a tie at ``alpha`` (abstain).
  Here it reuses CERTIFY's ``n`` estimation draws (an independent sample, so the test keeps
  its level), which gives the clean accuracy of ``g`` at no extra cost.
- :class:`Certifier` runs both on a batch, and an empirical attack on the smoothed classifier at
  each radius (PGD on the soft smoothed classifier of Salman et al. 2019, then ``g``'s vote of
  ``n0`` draws at the attacked image), so the report can check that certified accuracy never
  exceeds what an attack leaves.

Units: ``sigma`` and radii in [0, 1] pixel units, L2 over all pixels and channels. Noise is not
clipped to [0, 1]. Every image draws its noise from its own generator, seeded by the run seed and
the image's index in the split, on the model's device: a rerun gives the same certificates,
whatever the batch size of the loader or the DDP sharding (the empirical attack's random start
comes from the run's seeded global generator).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from lightning_modules.attacks import Attack, attack_mode
from lightning_modules.core.threat import format_eps, parse_eps
from lightning_modules.defenses.smoothing import SoftSmoothed, check_sigma

__all__ = ["ABSTAIN", "Certifier", "certify", "certify_markdown", "certify_summary",
           "image_generator", "lower_confidence_bound", "plot_certified",
           "predict_from_counts", "sample_counts"]

log = logging.getLogger(__name__)
ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper-Pearson lower bound on a binomial proportion after ``k``
    successes in ``n`` trials: the ``p`` with ``P(Binom(n, p) >= k) = alpha`` (0 for k = 0)."""
    if k <= 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def image_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The noise generator of image ``index`` of the split, on ``device``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


def sample_counts(net: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int,
                  generators: Sequence[torch.Generator], num_classes: int) -> torch.Tensor:
    """``(B, K)`` counts of ``argmax f(x_i + sigma * eps)`` over ``num`` draws per image,
    ``eps ~ N(0, I)`` from ``generators[i]``. Each image draws its noise in pieces of
    ``batch_size`` (the last one shorter), whatever the other images of the batch, so its
    counts depend only on its generator; whole pieces of several images share a forward pass
    of at most ``batch_size`` noisy images."""
    counts = torch.zeros(x.shape[0], num_classes, dtype=torch.long, device=x.device)
    parts: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []

    def flush() -> None:
        pred = net(torch.cat(parts)).argmax(dim=1)
        counts.index_put_((torch.cat(owners), pred), torch.ones_like(pred), accumulate=True)
        parts.clear()
        owners.clear()

    with torch.no_grad():
        for i in range(x.shape[0]):
            for start in range(0, num, batch_size):
                k = min(batch_size, num - start)
                if parts and sum(p.shape[0] for p in parts) + k > batch_size:
                    flush()
                noise = torch.randn((k, *x.shape[1:]), generator=generators[i],
                                    device=x.device, dtype=x.dtype)
                parts.append(x[i:i + 1] + sigma * noise)
                owners.append(torch.full((k,), i, device=x.device, dtype=torch.long))
        if parts:
            flush()
    return counts


def predict_from_counts(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cohen et al.'s PREDICT on ``(B, K)`` counts: the top class, or :data:`ABSTAIN` when the
    two-sided binomial test of the top two counts against a tie has p-value above ``alpha``."""
    top = counts.topk(2, dim=1) if counts.shape[1] > 1 else None
    out = []
    for i in range(counts.shape[0]):
        n_a, n_b = int(top.values[i, 0]), int(top.values[i, 1])
        p = binomtest(n_a, n_a + n_b, 0.5).pvalue if n_a + n_b > 0 else 1.0
        out.append(int(top.indices[i, 0]) if p <= alpha else ABSTAIN)
    return torch.tensor(out, dtype=torch.long)


def certify(net: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float,
            batch_size: int, generators: Sequence[torch.Generator], num_classes: int
            ) -> dict[str, torch.Tensor]:
    """Cohen et al.'s CERTIFY on a batch: ``{"pred": (B,) class or ABSTAIN, "radius": (B,) L2
    radius (0 when abstaining), "p_lower": (B,), "counts": (B, K) of the n estimation draws}``
    (CPU tensors)."""
    c_a = sample_counts(net, x, sigma, n0, batch_size, generators, num_classes).argmax(1)
    counts = sample_counts(net, x, sigma, n, batch_size, generators, num_classes)
    n_a = counts.gather(1, c_a.view(-1, 1)).squeeze(1).cpu()
    p_lower = torch.tensor([lower_confidence_bound(int(k), n, alpha) for k in n_a],
                           dtype=torch.float64)
    certified = p_lower >= 0.5
    radius = torch.where(certified, sigma * torch.from_numpy(norm.ppf(p_lower.numpy())),
                         torch.zeros_like(p_lower)).clamp_min(0.0)
    pred = torch.where(certified, c_a.cpu(), torch.full_like(c_a.cpu(), ABSTAIN))
    return {"pred": pred, "radius": radius, "p_lower": p_lower, "counts": counts.cpu()}


class Certifier:
    """CERTIFY, PREDICT and an empirical attack on the smoothed classifier, per batch.

    Args:
        sigma: smoothing noise std in [0, 1] pixel units (``null`` in YAML: the checkpoint's
            ``defense.sigma``, filled in by ``evaluate.py``).
        n0: draws that select the top class.
        n: draws that estimate its probability (Cohen et al.: 100,000).
        alpha: the certificate fails with probability at most ``alpha``.
        batch_size: noisy images per forward pass.
        radii: L2 radii of the report (certified accuracy at each; the empirical attack at
            each above 0).
        attack: the L2 PGD run against the soft smoothed classifier at each radius above 0
            (its ``eps`` is replaced by the radius; no ``early_stop``).
        attack_samples: noise draws ``m`` of that soft smoothed classifier (fixed during the
            attack, Salman et al. 2019).
    """

    def __init__(self, sigma: float, n0: int, n: int, alpha: float, batch_size: int,
                 radii: Sequence[float | str], attack: Attack, attack_samples: int) -> None:
        self.sigma = check_sigma(sigma, "evaluation.certify.sigma")
        for key, v in (("n0", n0), ("n", n), ("batch_size", batch_size),
                       ("attack_samples", attack_samples)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"evaluation.certify.{key}={v!r} must be an integer >= 1")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
                not 0 < alpha < 0.5:
            raise ValueError(f"evaluation.certify.alpha={alpha!r} must be in (0, 0.5)")
        self.radii = sorted({parse_eps(r, "evaluation.certify.radii") for r in radii})
        if not self.radii:
            raise ValueError("evaluation.certify.radii is empty")
        if not isinstance(attack, Attack) or attack.norm != "l2":
            raise ValueError("evaluation.certify.attack must be an L2 attack (the certificate "
                             "is L2)")
        if getattr(attack, "early_stop", False):
            raise ValueError("evaluation.certify.attack.early_stop must be false")
        self.n0, self.n, self.alpha, self.batch_size = n0, n, float(alpha), batch_size
        self.attack, self.attack_samples = attack, attack_samples

    @property
    def attack_radii(self) -> list[float]:
        return [r for r in self.radii if r > 0]

    def describe(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha,
                "batch_size": self.batch_size, "radii": [format_eps(r) for r in self.radii],
                "attack": self.attack.describe(), "attack_samples": self.attack_samples}

    def run(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int],
            seed: int, num_classes: int) -> torch.Tensor:
        """One row per image (float64, CPU): ``[label, CERTIFY class or -1, radius, PREDICT
        class or -1, then per radius above 0: vote right, vote undecided]``; "vote" is ``g``'s
        majority of ``n0`` draws at the image PGD found against the soft smoothed classifier,
        "undecided" that a binomial test of the true class's count against the winner's
        cannot reject a tie at ``alpha`` (a vote a correct ``g`` may lose by chance)."""
        gens = [image_generator(seed, int(i), x.device) for i in indices]
        with attack_mode(net, "eval"):
            cert = certify(net, x, self.sigma, self.n0, self.n, self.alpha, self.batch_size,
                           gens, num_classes)
            pred = predict_from_counts(cert["counts"], self.alpha)
            cols = [y.cpu().double(), cert["pred"].double(), cert["radius"],
                    pred.double()]
            for r in self.attack_radii:
                noise = torch.stack([self.sigma * torch.randn(
                    (self.attack_samples, *x.shape[1:]), generator=g, device=x.device,
                    dtype=x.dtype) for g in gens], dim=1)
                x_adv = self.attack.with_eps(r)(SoftSmoothed(net, noise), x, y, "multiclass")
                votes = sample_counts(net, x_adv, self.sigma, self.n0, self.batch_size, gens,
                                      num_classes).cpu()
                right = votes.argmax(1) == y.cpu()
                n_y = votes.gather(1, y.cpu().long().view(-1, 1)).squeeze(1)
                n_top = votes.max(1).values
                undecided = torch.tensor([
                    not ok and binomtest(int(a), int(a + b), 0.5).pvalue > self.alpha
                    for ok, a, b in zip(right.tolist(), n_y, n_top, strict=True)])
                cols += [right.double(), undecided.double()]
        return torch.stack(cols, dim=1)


def certify_summary(rows: torch.Tensor, certifier: Certifier, seconds: float,
                    sigma_source: str) -> dict[str, Any]:
    """The report's ``certify`` block from every image's row (:meth:`Certifier.run`)."""
    n = rows.shape[0]
    label, pred, radius, predicted = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    right = pred == label
    certified = {format_eps(r): float((right & (radius >= r)).double().mean())
                 for r in certifier.radii}
    # balanced: the mean over the classes present of their certified recall (a constant
    # predictor certifies the majority share at every radius, and 1 / classes balanced)
    classes = label.unique()
    balanced = {format_eps(r): float(torch.stack([
        (right & (radius >= r))[label == c].double().mean() for c in classes]).mean())
        for r in certifier.radii} if n else {}
    empirical = {}
    for k, r in enumerate(certifier.attack_radii):
        empirical[format_eps(r)] = {"acc": float(rows[:, 4 + 2 * k].mean()),
                                    "undecided": float(rows[:, 5 + 2 * k].mean())}
    return {
        **certifier.describe(), "sigma_source": sigma_source, "n_images": n,
        "certified_acc": certified, "certified_bal_acc": balanced,
        "majority_share": float(max((label == c).double().mean() for c in classes))
        if n else None,
        "average_certified_radius": float((radius * right.double()).mean()),
        "abstain_rate": float((pred == -1).double().mean()),
        "smoothed_clean_acc": float((predicted == label).double().mean()),
        "predict_abstain_rate": float((predicted == -1).double().mean()),
        "empirical_smoothed": empirical,
        "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / n, 4) if n else None,
        "curve": _curve(radius, right),
    }


def _curve(radius: torch.Tensor, right: torch.Tensor, points: int = 41) -> dict[str, list]:
    """Certified accuracy at evenly spaced radii up to the largest certified one (the plot)."""
    top = float(radius[right].max()) if bool(right.any()) else 0.0
    grid = np.linspace(0.0, max(top, 1e-6) * 1.05, points)
    return {"radius": [round(float(r), 5) for r in grid],
            "acc": [round(float((right & (radius >= r)).double().mean()), 5) for r in grid]}


def plot_certified(block: dict[str, Any], path: Path) -> None:
    """Certified accuracy against L2 radius, with the report's radii marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(block["curve"]["radius"], block["curve"]["acc"], where="post",
            label=f"certified (sigma {block['sigma']:g})")
    radii = [parse_eps(r) for r in block["certified_acc"]]
    ax.plot(radii, list(block["certified_acc"].values()), "o", color="C0")
    emp = block.get("empirical_smoothed") or {}
    if emp:
        ax.plot([parse_eps(r) for r in emp], [e["acc"] for e in emp.values()], "s--",
                color="C3", label="PGD on the smoothed classifier")
    ax.set_xlabel("L2 radius ([0, 1] pixel units)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"certified accuracy (n={block['n_images']}, N={block['n']}, "
                 f"alpha={block['alpha']:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def base_rows_at(results: list[dict], radius: float) -> list[dict]:
    """The report's L2 attack rows (base classifier) at ``radius``."""
    return [r for r in results if r.get("norm") == "l2" and math.isclose(r["eps"], radius)]


def certify_markdown(block: dict[str, Any], results: list[dict]) -> list[str]:
    """The report.md section: certified accuracy at the radii beside the empirical numbers."""
    lines = ["", "## Certified robustness (randomized smoothing, Cohen et al. 2019)", "",
             f"sigma {block['sigma']:g} ({block['sigma_source']}), N0 {block['n0']}, "
             f"N {block['n']}, alpha {block['alpha']:g}, {block['n_images']} images; "
             f"{block['seconds_per_image']} s per image. Smoothed classifier: clean accuracy "
             f"{block['smoothed_clean_acc']:.4f} (PREDICT, abstained "
             f"{block['predict_abstain_rate']:.1%}); CERTIFY abstained on "
             f"{block['abstain_rate']:.1%}; average certified radius "
             f"{block['average_certified_radius']:.4f}.", "",
             f"A constant predictor would certify accuracy {block['majority_share']:.4f} (the "
             "majority share) at every radius; balanced accuracy shows what the model learned.",
             "",
             "| L2 radius | certified acc | certified bal. acc | PGD on the smoothed classifier "
             "(undecided votes) | worst attack on the base classifier |",
             "|---|---|---|---|---|"]
    emp = block.get("empirical_smoothed") or {}
    for r, acc in block["certified_acc"].items():
        e = emp.get(r)
        base = base_rows_at(results, parse_eps(r))
        worst = min(base, key=lambda row: row["acc"]) if base else None
        lines.append(f"| {r} | {acc:.4f} | {block['certified_bal_acc'][r]:.4f} | "
                     + (f"{e['acc']:.4f} ({e['undecided']:.1%})" if e else "-") + " | "
                     + (f"{worst['acc']:.4f} ({worst['attack']})" if worst else "-") + " |")
    lines += ["", "Certified accuracy: share of images whose smoothed prediction is right and "
              "provably constant within that L2 radius (each certificate wrong with probability "
              "at most alpha). It is a lower bound on the smoothed classifier's accuracy under "
              "any attack of that size, so it must not exceed the attack on the smoothed "
              "classifier (honesty check `certified_not_above_empirical`). The base "
              "classifier alone is a different model: its attack rows are not bounded by the "
              "certificate.", "",
              "![certified accuracy vs radius](certified_accuracy.png)", ""]
    return lines
