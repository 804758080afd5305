"""Honesty checks of a robustness evaluation: the flags of AutoAttack (Croce & Hein, ICML 2020)
and the checklist of Carlini et al., "On Evaluating Adversarial Robustness" (2019).

Plain PyTorch and plain dicts. :func:`report_checks` reads an evaluation report's rows;
:func:`model_checks` probes the model on one batch;
:func:`probe_checks` attacks one batch with a huge eps, a stronger PGD and Square. Each check is a :class:`Check`: its name,
whether it passed, and one line saying what was seen. A failed check is never silent:
``evaluate.py`` prints it, writes it into the report, and stops when ``evaluation.strict``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_modules.attacks import PGD, attack_mode
from lightning_modules.attacks.config import attack_from_config
from lightning_modules.core.tasks import Task

__all__ = ["Check", "report_checks", "model_checks", "probe_checks", "certify_checks",
           "failed"]


@dataclass
class Check:
    check: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _group(row: dict) -> str | None:
    """A row's worst-case group (schema 2 rows without one: a ``worst*`` name is its own)."""
    if "group" in row:
        return row["group"]
    return row["attack"] if str(row["attack"]).startswith("worst") else None


def _is_worst(row: dict) -> bool:
    return _group(row) is not None and row["attack"] == _group(row)


def report_checks(clean: dict, rows: list[dict], n_images: int,
                  metrics: tuple[str, ...] = ("acc",), kinds: dict[str, str] | None = None,
                  agree: float = 0.05, bounded: tuple[str, ...] = ("acc", "bal_acc")
                  ) -> list[Check]:
    """Checks on the metric rows of one report (``attack``, ``eps``, metric values):

    - ``eps_zero_reproduces_clean``: every eps = 0 row equals the clean metrics;
    - ``monotone_in_eps``: no attack's metric rises with eps by more than one image;
    - ``worst_case_not_above_attacks``: each worst-case row is at most every attack of its group at its eps,
      in the metrics of ``bounded`` (default: accuracy and balanced accuracy of a single-label
      task). A per-sample worst case bounds only metrics that count per-sample successes:
      not AUROC (a ranking over images) nor a multi-label task's per-finding accuracy, for
      which the check is left out (``bounded=()``);
    - ``pgd_and_autoattack_agree`` (when ``kinds``, row name -> attack kind, has both a
      ``pgd`` and an ``autoattack``): at each eps, AutoAttack's accuracy is not above PGD's by
      more than one image, and no metric (accuracy, balanced accuracy) is below PGD's by more
      than ``agree`` (PGD then overestimates robustness).

    A check with nothing to test (no eps = 0 row; no attack at two radii) is left out.
    """
    out: list[Check] = []
    tol = 1.0 / max(1, n_images) + 1e-9
    zero = [r for r in rows if r["eps"] == 0 and not _is_worst(r)]
    bad = [f"{r['attack']} {m} {r[m]:.4f} vs {clean[m]:.4f}" for r in zero for m in metrics
           if m in r and abs(r[m] - clean[m]) > 1e-6]
    if zero:  # nothing to test without an eps = 0 row: no check, rather than an empty "ok"
        out.append(Check("eps_zero_reproduces_clean", not bad,
                         "; ".join(bad) if bad else f"{len(zero)} eps=0 row(s) equal clean"))
    by_attack: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_attack[r["attack"]].append(r)
    rises = []
    for name, group in by_attack.items():
        group = sorted(group, key=lambda r: r["eps"])
        for m in metrics:
            for a, b in zip(group, group[1:], strict=False):
                if m in a and m in b and b[m] > a[m] + tol:
                    rises.append(f"{name} {m} {a[m]:.4f} @ {a['eps_str']} -> {b[m]:.4f} @ "
                                 f"{b['eps_str']}")
    if any(len({r["eps"] for r in g}) > 1 for g in by_attack.values()):
        out.append(Check("monotone_in_eps", not rises,
                         "; ".join(rises) if rises else "no metric rises with eps"))
    above = []
    worst = [r for r in rows if _is_worst(r)]
    for w in worst:  # each worst case against the attacks of its own group and radius
        for r in rows:
            if not _is_worst(r) and r["eps"] == w["eps"] and \
                    ("group" not in r or _group(r) == _group(w)):
                above += [f"{w['attack']} {m} {w[m]:.4f} > {r['attack']} {r[m]:.4f} @ "
                          f"{w['eps_str']}" for m in metrics if m in bounded and m in w
                          and m in r and w[m] > r[m] + 1e-9]
    if worst and set(bounded) & set(metrics):
        out.append(Check("worst_case_not_above_attacks", not above,
                         "; ".join(above) if above else "worst case <= every attack"))
    kinds = kinds or {}
    pgds = [n for n, k in kinds.items() if k == "pgd"]
    autos = [n for n, k in kinds.items() if k == "autoattack"]
    if pgds and autos:
        at = {(r["attack"], r["eps"]): r for r in rows}
        gaps = []
        for (name, eps), r in at.items():
            if name not in autos or eps == 0:
                continue
            for p in pgds:
                q = at.get((p, eps))
                if q is None:
                    continue
                # AutoAttack above PGD: judged on accuracy (one image of slack); PGD far above
                # AutoAttack: on every metric (balanced accuracy shows misses in small classes)
                gaps += [f"{p} {m} {q[m]:.4f} vs {name} {r[m]:.4f} @ {r['eps_str']}"
                         for m in metrics if m in r and m in q and
                         ((m == "acc" and r[m] > q[m] + tol) or q[m] - r[m] > agree)]
        out.append(Check("pgd_and_autoattack_agree", not gaps,
                         "; ".join(gaps) if gaps else
                         f"within {agree:.2f} accuracy, AutoAttack never above PGD"))
    return out


def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task) -> list[Check]:
    """Probes on one batch (the model's modes are restored):

    - ``outputs_are_logits``: not probabilities (rows of a softmax, or all values in [0, 1]);
    - ``deterministic``: two forward passes in eval mode give the same outputs;
    - ``gradients_nonzero_finite``: the input gradient of the loss is finite and non-zero for
      most images (zero gradients mean masked or non-differentiable outputs).
    """
    out: list[Check] = []
    with attack_mode(model, "eval"), torch.no_grad():
        a, b = model(x).float(), model(x).float()
    in_unit = bool(((a >= 0) & (a <= 1)).all())
    sums_to_one = task.single_label and bool(torch.allclose(a.sum(1), torch.ones_like(a[:, 0]),
                                                            atol=1e-4))
    probs = sums_to_one or in_unit
    out.append(Check("outputs_are_logits", not probs,
                     "outputs look like probabilities (softmax/sigmoid applied in the model): "
                     "attacks on them are weak; return logits" if probs else
                     f"outputs range [{a.min():.3g}, {a.max():.3g}]"))
    same = bool(torch.allclose(a, b, atol=1e-5, rtol=1e-4))
    out.append(Check("deterministic", same,
                     "same outputs on two passes" if same else
                     f"outputs differ between two passes (max {float((a - b).abs().max()):.3g}): "
                     "a randomized model needs EOT attacks"))
    with attack_mode(model, "eval"), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = task.loss(model(xg), y).sum()
        (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    finite = bool(torch.isfinite(grad).all())
    zero_share = float((grad.flatten(1).abs().amax(1) == 0).float().mean())
    ok = finite and zero_share <= 0.5
    out.append(Check("gradients_nonzero_finite", ok,
                     f"input gradient zero for {zero_share:.0%} of images, finite: {finite}"))
    return out


def _robust_acc(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, task: Task
                ) -> float:
    x_adv = attack(model, x, y, task)
    with attack_mode(model, "eval"), torch.no_grad():
        return float((~task.wrong(model(x_adv), y)).float().mean())


def probe_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 num_classes: int, pgd: PGD, square_queries: int | None = 1000,
                 max_images: int = 64) -> list[Check]:
    """Attack probes on (at most ``max_images`` of) one batch, with ``pgd`` (the report's PGD
    at its largest radius) as the white-box reference; accuracy = share of images still right:

    - ``large_eps_reaches_chance``: PGD-50 at an eps that covers most of the image (L-inf 0.5,
      or an L2 norm of 0.5 per pixel on average) drives accuracy to chance (``1/classes``) or
      below; if not, gradients are masked or the attack is broken (Carlini et al. 2019, 3.1);
    - ``more_steps_never_help``: PGD with 5x the steps and 2 more restarts is not more than two
      images *above* ``pgd``; otherwise the loss surface is being gamed;
    - ``square_not_above_white_box`` (single-label, ``square_queries``): AutoAttack's black-box
      Square attack is not two images *below* the white-box attacks; a black-box attack that
      beats gradients means the gradients are masked (Croce & Hein 2020).
    """

    x, y = x[:max_images], y[:max_images]
    n = x.shape[0]
    tol = 2.0 / n + 1e-9
    out: list[Check] = []
    big = 0.5 if pgd.norm == "linf" else 0.5 * float(x[0].numel()) ** 0.5
    huge = pgd.replace(eps=big, steps=50, step_size=None, step_size_rel=2.5 / 50,
                       restarts=1, early_stop=True)
    acc_big = _robust_acc(model, huge, x, y, task)
    chance = 1.0 / num_classes
    out.append(Check("large_eps_reaches_chance", acc_big <= chance + tol,
                     f"PGD-50 at {pgd.norm} eps {big:.3g}: accuracy {acc_big:.4f}, chance "
                     f"{chance:.4f} ({n} images)"))
    acc = _robust_acc(model, pgd, x, y, task)
    stronger = pgd.replace(steps=pgd.steps * 5, restarts=pgd.restarts + 2)
    acc_strong = _robust_acc(model, stronger, x, y, task)
    out.append(Check("more_steps_never_help", acc_strong <= acc + tol,
                     f"PGD-{pgd.steps} x{pgd.restarts} {acc:.4f}, PGD-{stronger.steps} "
                     f"x{stronger.restarts} {acc_strong:.4f} at {pgd.norm} eps {pgd.eps:.4g} "
                     f"({n} images)"))
    if task.single_label and square_queries:
        square = attack_from_config("autoattack", eps=pgd.eps, norm=pgd.norm, components=["square"], square_queries=square_queries)
        acc_sq = _robust_acc(model, square, x, y, task)
        white = min(acc, acc_strong)
        out.append(Check("square_not_above_white_box", acc_sq >= white - tol,
                         f"Square ({square_queries} queries) {acc_sq:.4f}, white-box PGD "
                         f"{white:.4f} ({n} images)"))
    return out


def certify_checks(block: dict, n_images: int) -> list[Check]:
    """``certified_not_above_empirical``: at each radius of the ``certify`` block (randomized
    smoothing) that an attack on the smoothed classifier also ran at, the certified accuracy is
    not above that attack's accuracy plus its undecided votes (where the smoothed classifier's
    vote at the attacked image is statistically a tie, a correct model may lose it by chance)
    and one image. A certificate is a lower bound on accuracy under every attack of that size:
    above one, the certificate is wrong (a sigma other than the model's noise, a bound that
    is not one, the noise not reaching the model). Rows that attack the base classifier alone
    are a different model and are not compared."""
    tol = 1.0 / max(1, n_images) + 1e-9
    emp = block.get("empirical_smoothed") or {}
    seen, above = [], []
    for radius, acc in (block.get("certified_acc") or {}).items():
        e = emp.get(radius)
        if e is None:
            continue
        seen.append(radius)
        if acc > e["acc"] + e.get("undecided", 0.0) + tol:
            above.append(f"certified {acc:.4f} > attacked {e['acc']:.4f} (+{e['undecided']:.4f} "
                         f"undecided) @ L2 {radius}")
    if not seen:
        return []
    return [Check("certified_not_above_empirical", not above,
                  "; ".join(above) if above else
                  f"certified <= PGD on the smoothed classifier at L2 {', '.join(seen)}")]


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]
