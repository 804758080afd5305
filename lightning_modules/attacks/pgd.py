"""PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018; L-inf and L2, random restarts, early stop for evaluation; the
task's loss or the margin (C&W) loss of Carlini & Wagner (S&P 2017); untargeted or targeted
(a random other class, or the least likely clean class). The call contract is in
:mod:`.base`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.attacks.base import Attack, input_grad
from lightning_modules.core.tasks import LossFn, Task, cross_entropy_per_sample
from lightning_modules.core.threat import parse_eps

__all__ = ["PGD", "margin_loss", "draw_targets", "draw_findings"]

_STARTS = {True: "uniform", False: "none", "uniform": "uniform", "normal": "normal",
           "none": "none"}
LOSSES = ("task", "margin")
TARGETS = (None, "random", "least_likely", "hide", "add")  # the last two: multi-label


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W margin per sample, ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    z = logits.float()
    true = z.gather(1, y.long().view(-1, 1)).squeeze(1)
    other = z.scatter(1, y.long().view(-1, 1), float("-inf")).amax(dim=1)
    return other - true


def draw_targets(logits: torch.Tensor, y: torch.Tensor, how: str) -> torch.Tensor:
    """Target classes for targeted PGD: ``random`` (uniform over the classes other than ``y``)
    or ``least_likely`` (the lowest logit)."""
    if how == "least_likely":
        return logits.argmin(dim=1)
    num_classes = logits.shape[1]
    shift = torch.randint(1, num_classes, y.shape, device=y.device)
    return (y.long() + shift) % num_classes


def draw_findings(clean_logits: torch.Tensor, how: str, finding: int | None = None
                  ) -> torch.Tensor:
    """Multi-label targets, encoded per finding as ``goal + 2 * chosen``: per sample one finding
    is chosen (``finding``, or uniformly among the findings it can act on: present in the
    clean prediction for ``hide``, absent for ``add``; among all when there is none) and its
    goal is the flipped clean prediction; every other finding's goal is its clean prediction.
    """
    pred = clean_logits > 0
    n, k = pred.shape
    if finding is not None:
        chosen = torch.full((n,), int(finding), device=pred.device)
    else:
        eligible = (pred if how == "hide" else ~pred).float()
        eligible[eligible.sum(1) == 0] = 1.0  # nothing to hide (add): any finding
        chosen = torch.multinomial(eligible, 1).squeeze(1)
    onehot = torch.zeros_like(pred).scatter_(1, chosen.view(-1, 1), True)
    goal = torch.where(onehot, torch.full_like(pred, how == "add"), pred)
    return goal.float() + 2 * onehot.float()


def _finding_goal(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(goal vector, chosen-finding mask) from :func:`draw_findings`' encoding."""
    chosen = labels >= 2
    return labels - 2 * chosen.float(), chosen


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class PGD(Attack):
    """Projected gradient ascent on a per-sample loss inside an L-inf or L2 ball.

    Args:
        eps: radius of the ball in [0, 1] pixel units (float or a fraction string, "8/255").
        steps: number of gradient steps (>= 1).
        step_size: ascent step in pixel units; ``None`` means ``2.5 * eps / steps`` (Madry et al.).
        step_size_rel: alternatively the step as a multiple of eps (e.g. 1.25 for the fast
            FGSM of Wong et al. 2020); exclusive with ``step_size``.
        norm: ``"linf"`` or ``"l2"``.
        random_start: ``True``/``"uniform"`` (uniform in the ball, Madry et al.), ``"normal"``
            (``x + 0.001 * N(0, 1)``, as in TRADES) or ``False``.
        restarts: independent random restarts; per sample the strongest result is kept
            (a misclassified example first, then the highest loss). Use > 1 for evaluation.
        model_mode: ``"eval"`` (BatchNorm running statistics) or ``"train"`` (batch statistics,
            running statistics untouched); see :func:`.mode.attack_mode`.
        early_stop: for evaluation: a sample whose current point is already misclassified
            (argmax) keeps that point and leaves the batch, so later steps cost less as the
            attack succeeds. Never weaker than plain PGD for accuracy-type metrics (a success
            is never undone by a later step). Single-label tasks only (ignored for
            multi-label, whose AUROC depends on every logit); needs ``model_mode="eval"``
            (a shrinking batch would change BatchNorm batch statistics). Not for training.
        loss: ``"task"`` (cross-entropy or BCE, or the caller's ``loss_fn``) or ``"margin"``,
            the C&W margin ``max_{j != y} z_j - z_y`` on the logits ``z`` (single-label).
        targeted: ``None`` (untargeted), ``"random"`` (a uniformly drawn class other than the
            true one) or ``"least_likely"`` (the lowest clean logit): the attack then drives
            the prediction to the target (maximises ``-CE(z, t)``, or the margin
            ``z_t - max_{j != t} z_j``) and counts a success when ``argmax z = t``.
            Multi-label: ``"hide"`` (make a finding the model sees absent) or ``"add"`` (make
            an absent one present): the attack minimises the BCE toward the clean prediction
            with that one finding flipped (the others kept) and succeeds when it flips.
        finding: multi-label targeted only: the index of the finding to hide or add; ``None``
            draws one per image among those it can act on.

    Example:
        >>> attack = PGD(eps="8/255", steps=10)
        >>> x_adv = attack(model, images, labels)           # images in [0, 1]
    """

    name = "pgd"

    def __init__(
        self,
        eps: float | str,
        steps: int,
        step_size: float | str | None,
        norm: str,
        random_start: bool | str,
        restarts: int,
        model_mode: str,
        step_size_rel: float | None,
        early_stop: bool,
        loss: str,
        targeted: str | None,
        finding: int | None,
    ) -> None:
        super().__init__(eps=eps, norm=norm, model_mode=model_mode)
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} must be one of {LOSSES}")
        if targeted not in TARGETS:
            raise ValueError(f"targeted={targeted!r} must be one of {TARGETS}")
        if finding is not None and (targeted not in ("hide", "add") or isinstance(finding, bool)
                                    or int(finding) != finding or finding < 0):
            raise ValueError(f"finding={finding!r} must be a finding index >= 0, and only with "
                             "targeted=hide|add")
        self.loss = loss
        self.targeted = targeted
        self.finding = None if finding is None else int(finding)
        if early_stop and model_mode != "eval":
            raise ValueError("early_stop=true needs model_mode='eval' (a shrinking batch would "
                             "change BatchNorm batch statistics)")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts={restarts!r} must be an integer >= 1")
        if random_start not in _STARTS:
            raise ValueError(f"random_start={random_start!r} must be true, false, 'uniform' "
                             "or 'normal'")
        if step_size is not None and step_size_rel is not None:
            raise ValueError("give step_size or step_size_rel, not both")
        self.early_stop = bool(early_stop)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.start = _STARTS[random_start]
        self._step_size = None if step_size is None else parse_eps(step_size, "step_size")
        self._step_rel = None if step_size_rel is None else parse_eps(step_size_rel,
                                                                      "step_size_rel")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this configuration can attack (see ``loss`` and ``targeted``)."""
        if self.targeted in ("hide", "add"):
            return ("multilabel",)
        if self.targeted is not None or self.loss == "margin":
            return ("multiclass",)
        return ("multiclass", "multilabel")

    @property
    def random_start(self) -> bool:
        return self.start != "none"

    @property
    def step_size(self) -> float:
        """Ascent step in [0, 1] pixel units."""
        if self._step_size is not None:
            return self._step_size
        if self._step_rel is not None:
            return self._step_rel * self.eps
        return 2.5 * self.eps / self.steps

    def _kwargs(self) -> dict[str, Any]:
        return {"eps": self.eps, "steps": self.steps, "step_size": self._step_size,
                "norm": self.norm, "random_start": self.start, "restarts": self.restarts,
                "model_mode": self.model_mode, "step_size_rel": self._step_rel,
                "early_stop": self.early_stop, "loss": self.loss, "targeted": self.targeted,
                "finding": self.finding}

    def with_eps(self, eps: float | str) -> PGD:
        """A copy at radius ``eps``; a step given in pixels keeps its ratio to eps."""
        rel = self._step_rel
        if self._step_size is not None:
            rel = self._step_size / self.eps if self.eps > 0 else None
        return self.replace(eps=parse_eps(eps), step_size=None, step_size_rel=rel)

    def describe(self) -> dict:
        return {
            "attack": self.name,
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.start,
            "restarts": self.restarts,
            **({"early_stop": True} if self.early_stop else {}),
            **({"loss": self.loss} if self.loss != "task" else {}),
            **({"targeted": self.targeted} if self.targeted else {}),
            **({"finding": self.finding} if self.finding is not None else {}),
        }

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.start == "uniform":
            return self.threat.random_init(x)
        if self.start == "normal":
            return self.threat.project(x + 0.001 * torch.randn_like(x), x)
        return x.clone()

    def _goal(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
              loss_fn: LossFn):
        """(labels the loss sees, loss to maximise, success(logits, labels) per sample)."""
        if self.loss == "task" and self.targeted is None:
            return y, loss_fn, task.wrong
        multi = self.targeted in ("hide", "add")
        if multi != (not task.single_label) or (self.loss == "margin" and multi):
            raise ValueError(f"PGD loss={self.loss!r}, targeted={self.targeted!r} is not for "
                             f"{task.name} tasks (multi-label: targeted hide|add with the task "
                             "loss; single-label: random|least_likely)")
        if multi:
            with torch.no_grad():
                labels = draw_findings(model(x), self.targeted, self.finding)

            def towards(logits, enc):
                goal, _ = _finding_goal(enc)
                return -nn.functional.binary_cross_entropy_with_logits(
                    logits.float(), goal, reduction="none").sum(dim=1)

            def flipped(logits, enc):
                goal, chosen = _finding_goal(enc)
                return ((logits > 0) == goal.bool())[chosen]  # one chosen finding per row
            return labels, towards, flipped
        if self.targeted is None:
            return y, margin_loss, task.wrong
        with torch.no_grad():
            target = draw_targets(model(x), y, self.targeted)
        if self.loss == "margin":
            def objective(logits, t):
                return -margin_loss(logits, t)
        else:
            def objective(logits, t):
                return -cross_entropy_per_sample(logits, t)

        def hit(logits, t):
            return logits.argmax(dim=1) == t
        return target, objective, hit

    def _one_run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn, success) -> torch.Tensor:
        x_adv = self._start(x)
        if self.early_stop and task.single_label:
            return self._early_stopping_run(model, x, y, loss_fn, x_adv, success)
        threat, step_size = self.threat, self.step_size
        for _ in range(self.steps):
            grad = input_grad(model, x_adv, y, loss_fn)
            with torch.no_grad():
                x_adv = threat.project(threat.step(x_adv.detach(), grad, step_size), x)
        return x_adv.detach()

    def _early_stopping_run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            loss_fn: LossFn, x_adv: torch.Tensor, success) -> torch.Tensor:
        """PGD steps on the samples not yet misclassified (or not yet at their target)
        only (see ``early_stop``)."""
        threat, step_size, fmt = self.threat, self.step_size, _memory_format(x)
        out = x_adv.detach().clone()
        active = torch.arange(x.shape[0], device=x.device)
        xa, xs, ys = out, x, y
        for _ in range(self.steps):
            grad, logits = input_grad(model, xa, ys, loss_fn, return_logits=True)
            with torch.no_grad():
                stepped = threat.project(threat.step(xa.detach(), grad, step_size), xs)
                going = ~success(logits, ys)
                out[active] = torch.where(going.view(-1, *([1] * (x.dim() - 1))), stepped, xa)
                if bool(going.all()):  # one host sync per step: evaluation only
                    xa = stepped
                    continue
                active, xs, ys = active[going], xs[going], ys[going]
                if active.numel() == 0:
                    break
                xa = stepped[going].contiguous(memory_format=fmt)
                xs = xs.contiguous(memory_format=fmt)
        return out

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task,
                 loss_fn: LossFn) -> torch.Tensor:
        y, loss_fn, success = self._goal(model, x, y, task, loss_fn)
        best = self._one_run(model, x, y, task, loss_fn, success)
        if self.restarts == 1:
            return best
        best_score = self._score(model, best, y, loss_fn, success)
        for _ in range(self.restarts - 1):
            cand = self._one_run(model, x, y, task, loss_fn, success)
            score = self._score(model, cand, y, loss_fn, success)
            better = score > best_score
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_score = torch.maximum(score, best_score)
        return best

    @staticmethod
    def _score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
               success) -> torch.Tensor:
        """Per-sample strength of an adversarial example: its loss, plus a large bonus when it
        succeeds (misclassified, or at its target)."""
        with torch.no_grad():
            logits = model(x_adv)
            return loss_fn(logits, y).float() + 1e6 * success(logits, y).float()
