"""Honesty checks of a robustness evaluation: the flags of AutoAttack (Croce & Hein, ICML 2020)
and the checklist of Carlini et al., "On Evaluating Adversarial Robustness" (2019).

Plain PyTorch and plain dicts. :func:`report_checks` reads an evaluation report's rows and the
engine's cost (adversarial images outside their threat model); :func:`model_checks` probes the
model on one batch; :func:`more_steps_check` attacks the images the evaluation counted robust
with a much stronger PGD before the evaluation runs (and ``evaluate.py`` adds that PGD to the
evaluation when it finds more); :func:`probe_checks` attacks one batch with a huge eps and
Square. Each check is a :class:`Check`: its name, whether it passed, and one line saying what
was seen; each is tested against a model or attack built to trip it (tests/test_honesty.py). A failed check is never silent:
``evaluate.py`` prints it, writes it into the report, and stops when ``evaluation.strict``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_modules.attacks import PGD, attack_mode
from lightning_modules.attacks.config import attack_from_config
from lightning_modules.attacks.pgd import margin_loss
from lightning_modules.core.tasks import Task

__all__ = ["Check", "attack_kind", "report_checks", "model_checks", "probe_checks",
           "more_steps_check", "stronger_pgd", "certify_checks", "failed"]


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


def attack_kind(describe: dict) -> str:
    """What a row's attack is, for the checks: ``pgd`` only for the untargeted PGD on the task
    loss (the reference white-box attack); ``pgd-margin`` / ``pgd-<target>`` for its variants
    (in ``evaluation=full`` every PGD is named ``pgd``); else the attack's own name."""
    name = describe.get("attack")
    if name == "pgd":
        if describe.get("targeted"):
            return f"pgd-{describe['targeted']}"
        if describe.get("loss", "task") != "task":
            return f"pgd-{describe['loss']}"
    return str(name)


STRONG = ("autoattack", "fast")  # attacks checked against the reference PGD


def report_checks(clean: dict, rows: list[dict], n_images: int,
                  metrics: tuple[str, ...] = ("acc",), kinds: dict[str, str] | None = None,
                  agree: float = 0.05, bounded: tuple[str, ...] = ("acc", "bal_acc"),
                  cascade: bool = False, cost: dict[str, dict] | None = None) -> list[Check]:
    """Checks on the metric rows of one report (``attack``, ``eps``, metric values):

    - ``attacks_stay_in_threat_model`` (with ``cost``, the engine's per-cell cost): no
      adversarial image of any attack, on any image, left its eps ball or [0, 1];
    - ``monotone_in_eps``: no attack's metric rises with eps by more than one image;
    - ``worst_case_not_above_attacks``: each worst-case row (``worst``, ``worst-linf``, ...)
      is at most every attack of its own group at its eps, in the metrics of ``bounded``
      (default: accuracy and balanced accuracy of a single-label task). A per-sample worst
      case bounds only metrics that count per-sample successes: not AUROC (a ranking over
      images) nor a multi-label task's per-finding accuracy (``bounded=()``);
    - ``pgd_and_<attack>_agree`` for AutoAttack and the fast attack (``kinds``: row name ->
      :func:`attack_kind`; the reference is the untargeted PGD on the task loss, never its
      margin or targeted variants): at each eps, no metric of PGD is above the stronger
      attack's by more than ``agree`` (PGD then overestimates robustness), and, without the
      cascade, the stronger attack's accuracy is not above PGD's by more than one image (it
      would be weaker than PGD). With the cascade its row already includes PGD, so only the
      first direction can be tested; the detail says so.

    A check with nothing to test (no attack at two radii, no worst case) is left out.
    """
    out: list[Check] = []
    tol = 1.0 / max(1, n_images) + 1e-9
    if cost:
        bad = {k: c["outside_threat_model"] for k, c in cost.items()
               if c.get("outside_threat_model")}
        if any("outside_threat_model" in c for c in cost.values()):
            out.append(Check("attacks_stay_in_threat_model", not bad,
                             "; ".join(f"{k}: {v} adversarial image(s) outside the eps ball or "
                                       "[0, 1]" for k, v in bad.items()) if bad else
                             "every adversarial image inside its eps ball and [0, 1]"))
    by_attack: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_attack[r["attack"]].append(r)
    rises = []
    for name, group in by_attack.items():
        group = sorted(group, key=lambda r: r["eps"])
        for m in metrics:
            for a, b in zip(group, group[1:], strict=False):
                if m in a and m in b and a[m] is not None and b[m] is not None \
                        and b[m] > a[m] + tol:
                    rises.append(f"{name} {m} {a[m]:.4f} @ {a['eps_str']} -> {b[m]:.4f} @ "
                                 f"{b['eps_str']}")
    if any(len({r["eps"] for r in g}) > 1 for g in by_attack.values()):
        out.append(Check("monotone_in_eps", not rises,
                         "; ".join(rises) if rises else "no metric rises with eps"))
    above, compared = [], 0
    worst = [r for r in rows if _is_worst(r)]
    for w in worst:  # each worst case against the attacks of its own group and radius
        for r in rows:
            if not _is_worst(r) and r["eps"] == w["eps"] and \
                    ("group" not in r or _group(r) == _group(w)):
                for m in metrics:
                    if m in bounded and m in w and m in r:
                        compared += 1
                        if w[m] > r[m] + 1e-9:
                            above.append(f"{w['attack']} {m} {w[m]:.4f} > {r['attack']} "
                                         f"{r[m]:.4f} @ {w['eps_str']}")
    if compared:
        out.append(Check("worst_case_not_above_attacks", not above,
                         "; ".join(above) if above else
                         f"worst case <= every attack of its group ({compared} comparisons)"))
    kinds = kinds or {}
    pgds = [n for n, k in kinds.items() if k == "pgd"]
    at = {(r["attack"], r["eps"]): r for r in rows}
    for strong in STRONG:
        names = [n for n, k in kinds.items() if k == strong]
        gaps, pairs = [], 0
        for name in names:
            for p in pgds:
                for (a, eps), r in at.items():
                    q = at.get((p, eps))
                    if a != name or eps == 0 or q is None:
                        continue
                    pairs += 1
                    # PGD far above the stronger attack: on every metric (balanced accuracy
                    # shows misses in small classes); the stronger attack above PGD: accuracy,
                    # one image of slack, only where its row is its own (no cascade)
                    gaps += [f"{p} {m} {q[m]:.4f} vs {name} {r[m]:.4f} @ {r['eps_str']}"
                             for m in metrics if m in r and m in q and
                             (q[m] - r[m] > agree or
                              (not cascade and m == "acc" and r[m] > q[m] + tol))]
        if pairs:
            scope = ("cascade: its rows include PGD's successes, so only PGD above it is "
                     "tested" if cascade else "both directions tested")
            out.append(Check(f"pgd_and_{strong}_agree", not gaps,
                             "; ".join(gaps) + f" ({scope})" if gaps else
                             f"PGD within {agree:.2f} of {strong} at {pairs} radii ({scope})"))
    return out


def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task) -> list[Check]:
    """Probes on one batch (the model's modes are restored):

    - ``outputs_are_logits``: not probabilities (rows of a softmax, or all values in [0, 1]);
    - ``deterministic``: two forward passes in eval mode give the same outputs;
    - ``gradients_nonzero_finite``: the input gradient is finite and non-zero for every image,
      on the C&W margin for a single-label task (the cross-entropy's gradient underflows to
      0 in float32 on very confident images: that share is stated, it is what the margin
      loss of the attacks is for) and on the task loss for a multi-label one. One image with
      a zero gradient is a masked or non-differentiable output (a rounding step, a
      quantisation, a saturated activation).
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
    def zero_share(loss_fn) -> tuple[float, bool]:
        with attack_mode(model, "eval"), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            loss = loss_fn(model(xg).float(), y).sum()
            (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(x)
        flat = grad.flatten(1)
        return float((flat.abs().amax(1) == 0).float().mean()), bool(torch.isfinite(flat).all())

    if task.single_label:
        zero, finite = zero_share(margin_loss)
        ce_zero, _ = zero_share(task.loss)
        extra = f"; cross-entropy gradient zero (saturated) for {ce_zero:.0%}"
    else:
        (zero, finite), extra = zero_share(task.loss), ""
    n = x.shape[0]
    out.append(Check("gradients_nonzero_finite", finite and zero == 0,
                     f"input gradient{' of the margin' if task.single_label else ''} zero for "
                     f"{round(zero * n)} of {n} images, finite: {finite}{extra}"))
    return out


def _robust_acc(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, task: Task
                ) -> float:
    x_adv = attack(model, x, y, task)
    with attack_mode(model, "eval"), torch.no_grad():
        return float((~task.wrong(model(x_adv), y)).float().mean())


def stronger_pgd(pgd: PGD, task: Task) -> dict[str, PGD]:
    """The attacks ``more_steps_never_help`` runs against the reported ones: ``pgd`` with 5x
    the steps and one more restart on the task loss and (single-label) one run on the C&W
    margin: 2 more runs in all (multi-label: 2 more restarts on the task loss). Uniform random
    starts and Madry et al.'s step (2.5 eps / steps), whatever ``pgd`` sets: a broken step size
    must not be inherited by the attack that checks it."""
    base = pgd.replace(steps=pgd.steps * 5, restarts=pgd.restarts + 1, loss="task",
                       targeted=None, finding=None, early_stop=True, step_size=None,
                       step_size_rel=None, random_start=True)  # Madry's step: 2.5 eps / steps
    if not task.single_label:
        return {"pgd_strong": base.replace(restarts=pgd.restarts + 2)}
    return {"pgd_strong": base, "pgd_strong_cw": base.replace(loss="margin", restarts=1)}


def more_steps_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                     reported_robust: torch.Tensor, reported: str, stronger: dict[str, PGD],
                     tolerance: int = 1,
                     redraw: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> tuple[Check, torch.Tensor]:
    """``more_steps_never_help``: on the images ``x`` that the reported evaluation (``reported``
    names it) counted robust (``reported_robust``, per image), the ``stronger`` attacks
    (:func:`stronger_pgd`) may fool at most ``tolerance`` images. More fooled means the reported
    attacks had not converged: their robust accuracy is only an upper bound, and ``evaluate.py``
    adds the stronger attacks to the evaluation (the worst case then includes them).
    ``redraw`` (optional) reruns the reported attacks, with fresh random starts, on the images
    given by a boolean mask and returns their robust flags: only images that survive this second
    draw too count against the reported attacks, so random-start noise in a converged attack is
    not taken for an unconverged one. Returns the check and the per-image robust flags under the
    stronger attacks."""
    with attack_mode(model, "eval"), torch.no_grad():
        robust = ~task.wrong(model(x), y)
    for attack in stronger.values():
        x_adv = attack(model, x, y, task)
        with attack_mode(model, "eval"), torch.no_grad():
            robust &= ~task.wrong(model(x_adv), y)
    flagged = reported_robust & ~robust
    extra = first_draw = int(flagged.sum())
    if redraw is not None and extra > tolerance:
        extra = int(redraw(flagged).sum())
    first = next(iter(stronger.values()))
    what = (f"PGD-{first.steps} x{first.restarts} ({' and '.join(a.loss for a in stronger.values())}"
            f" loss) at {first.norm} eps {first.eps:.4g} on {x.shape[0]} images")
    counted = f"fooled {extra} image(s) that {reported} counted robust"
    if extra != first_draw:
        counted += (f" after a second draw of {reported} on the {first_draw} it fooled first "
                    f"(random-start noise: {first_draw - extra} fooled on the second draw)")
    if extra > tolerance:
        detail = (f"{what} {counted}: {reported} had not converged and its robust accuracy is an "
                  f"upper bound; the stronger attacks were added to this evaluation "
                  f"({', '.join(stronger)}) and the worst case includes them")
    else:
        detail = f"{what} {counted}"
    return Check("more_steps_never_help", extra <= tolerance, detail), robust


def probe_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 num_classes: int, pgd: PGD, square_queries: int | None = 1000,
                 max_images: int = 64, white_acc: float | None = None) -> list[Check]:
    """Attack probes on (at most ``max_images`` of) one batch, with ``pgd`` (the report's PGD
    at its largest radius) as the white-box reference; accuracy = share of images still right:

    - ``large_eps_breaks_the_model``: PGD-50 at an eps that covers most of the image (L-inf
      0.5, or an L2 norm of 0.5 per pixel on average) leaves at most 10% of the images right
      (and two images): at that radius an image can be moved halfway to any other, so any
      sound model is broken, whatever its number of classes (chance level would let a binary
      model keep half its images); if not, gradients are masked or the attack is broken
      (Carlini et al. 2019, 3.1);
    - ``square_not_above_white_box`` (single-label, ``square_queries``): AutoAttack's black-box
      Square attack is not two images *below* the white-box attacks (``white_acc``: the
      reported worst case on these images, else ``pgd``'s); a black-box attack that beats
      gradients means the gradients are masked (Croce & Hein 2020).
    """

    x, y = x[:max_images], y[:max_images]
    n = x.shape[0]
    tol = 2.0 / n + 1e-9
    out: list[Check] = []
    big = 0.5 if pgd.norm == "linf" else 0.5 * float(x[0].numel()) ** 0.5
    huge = pgd.replace(eps=big, steps=50, step_size=None, step_size_rel=2.5 / 50,
                       restarts=1, early_stop=True, loss="task", targeted=None, finding=None)
    acc_big = _robust_acc(model, huge, x, y, task)
    limit = min(0.1, 1.0 / num_classes)
    out.append(Check("large_eps_breaks_the_model", acc_big <= limit + tol,
                     f"PGD-50 at {pgd.norm} eps {big:.3g}: accuracy {acc_big:.4f}, at most "
                     f"{limit:.2f} expected ({n} images)"))
    if task.single_label and square_queries:
        square = attack_from_config("autoattack", eps=pgd.eps, norm=pgd.norm,
                                    components=["square"], square_queries=square_queries)
        acc_sq = _robust_acc(model, square, x, y, task)
        white = white_acc if white_acc is not None else _robust_acc(model, pgd, x, y, task)
        out.append(Check("square_not_above_white_box", acc_sq >= white - tol,
                         f"Square ({square_queries} queries) {acc_sq:.4f}, white-box "
                         f"{white:.4f} at {pgd.norm} eps {pgd.eps:.4g} ({n} images)"
                         + ("" if acc_sq >= white - tol else
                            ": the white-box number at this radius is an upper bound")))
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
