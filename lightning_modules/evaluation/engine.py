"""The robust-evaluation engine: clean and adversarial predictions of a batch, into metrics.

Plain PyTorch and torchmetrics (no Lightning). For a model, a batch and a suite of named attacks
it computes the clean logits and each attack's adversarial logits, optionally each sample's
**worst case** over groups of attacks, and feeds one ``MetricCollection`` per kind (``clean``,
each attack, each worst-case group). Both the training module's validation/test
(:class:`~lightning_modules.training.module.RobustClassifier`) and ``evaluate.py``
(:class:`~lightning_modules.evaluation.module.EvaluationModule`) use it; torchmetrics reduces the
states across DDP ranks when :meth:`RobustEvaluator.compute` is called.

Worst case (as in torchattacks' ``MultiAttack`` and AutoAttack's robust accuracy): per sample,
among the clean prediction and the group's attacks, the logits that are misclassified (the
task's ``wrong``) with the highest loss; where none is misclassified, the highest-loss logits.
A sample counts as robust only if it is right clean and under every attack of the group.

Cascade (``cascade=True``, single-label; as AutoAttack runs its components): the attacks of a
worst-case group run in order, each only on the samples still robust (right clean and under
every earlier attack of the group); a sample fooled before keeps the logits that fooled it.
Each attack's row is then *cumulative*: the worst case over the clean prediction and the
group's attacks up to it, and its cost counts only the images it attacked. :meth:`cost` gives
seconds and images attacked per attack (summed across ranks).

Padding (``keep``): under DDP, Lightning's ``DistributedSampler`` pads the last shard with
duplicates of the first samples so that every rank gets as many batches. A batch may come with
a boolean ``keep`` mask; the samples it leaves out are attacked like the others (every rank
does the same work, batch for batch) but count in no metric, loss, fooling rate, image count
or prediction count. Attack cost (seconds, images attacked) is the work done, padding included.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric, SumMetric

from lightning_modules.attacks import Attack
from lightning_modules.core.tasks import Task, check_task
from lightning_modules.evaluation.metrics import build_metrics, scalar_metrics
from lightning_modules.evaluation.passes import PassCounter

__all__ = ["RobustEvaluator", "EvalBatch", "PredictionCounts", "worst_case_logits"]

CLEAN = "clean"


@dataclass
class EvalBatch:
    """The logits one batch produced: clean, per attack, per worst-case group."""

    clean: torch.Tensor
    adv: dict[str, torch.Tensor] = field(default_factory=dict)
    worst: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per attack
    attacked: dict[str, int] = field(default_factory=dict)   # images per attack
    forward: dict[str, int] = field(default_factory=dict)    # image passes per attack
    backward: dict[str, int] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)    # images outside the threat model

    def state(self) -> dict:
        """Tensors and plain values (``torch.save`` / ``weights_only`` load), on the CPU."""
        return {"clean": self.clean.cpu(), "adv": {k: v.cpu() for k, v in self.adv.items()},
                "worst": {k: v.cpu() for k, v in self.worst.items()},
                "seconds": dict(self.seconds), "attacked": dict(self.attacked),
                "forward": dict(self.forward), "backward": dict(self.backward),
                "outside": dict(self.outside)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EvalBatch:
        return cls(clean=state["clean"].to(device),
                   adv={k: v.to(device) for k, v in state["adv"].items()},
                   worst={k: v.to(device) for k, v in state["worst"].items()},
                   seconds=dict(state["seconds"]), attacked=dict(state["attacked"]),
                   forward=dict(state.get("forward", {})),
                   backward=dict(state.get("backward", {})),
                   outside=dict(state.get("outside", {})))


def worst_case_logits(candidates: Sequence[torch.Tensor], y: torch.Tensor,
                      task: Task) -> torch.Tensor:
    """Per sample, the candidate logits that are wrong with the highest loss (else the
    highest loss): ``(batch, classes)`` from a sequence of ``(batch, classes)``."""
    stacked = torch.stack([c.float() for c in candidates])  # (A, B, C)
    score = torch.stack([task.loss(c, y) + 1e6 * task.wrong(c, y).float() for c in stacked])
    pick = score.argmax(dim=0)  # (B,)
    return stacked[pick, torch.arange(stacked.shape[1], device=stacked.device)]


class PredictionCounts(Metric):
    """How many samples were predicted as each class (argmax), summed across ranks."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor) -> None:
        self.counts += torch.bincount(logits.argmax(dim=1), minlength=self.counts.numel())

    def compute(self) -> torch.Tensor:
        return self.counts


def predictions(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Predicted class ``(N,)`` (single-label) or predicted findings ``(N, K)`` at logit 0
    (probability 0.5; multi-label)."""
    return logits.argmax(dim=1) if task.single_label else logits > 0


def _clock(x: torch.Tensor) -> float:
    """Wall time after the device finished its queued work (CUDA runs asynchronously)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


class RobustEvaluator(nn.Module):
    """Clean, adversarial and worst-case metrics of a model over batches.

    Args:
        task: ``multiclass`` or ``multilabel``.
        num_classes: classes or findings.
        attacks: name -> attack, run in order on every batch.
        worst_case: name -> attack names whose per-sample worst case (with the clean
            prediction) is scored as its own kind; ``None``/empty = none.
        per_class: add recall per class (multiclass) or AUROC per finding (multilabel).
        cascade: run a group's later attacks only on its still-robust samples (single-label).
    """

    def __init__(self, task: str, num_classes: int, attacks: Mapping[str, Attack],
                 worst_case: Mapping[str, Sequence[str]] | None = None,
                 per_class: bool = False, cascade: bool = False) -> None:
        super().__init__()
        self.task = Task(check_task(task))  # unweighted: evaluation losses are unweighted
        self.attacks = dict(attacks)
        self.worst_case = {k: list(v) for k, v in (worst_case or {}).items()}
        for group, names in self.worst_case.items():
            unknown = sorted(set(names) - set(self.attacks))
            if unknown or not names:
                raise ValueError(f"worst-case group {group!r} names unknown attacks {unknown}")
        if cascade and not self.task.single_label:
            raise ValueError("cascade needs a single-label task: a multi-label sample with one "
                             "wrong finding would leave every other finding unattacked")
        # attack -> its worst-case group, for the cascade
        self.group_of: dict[str, str] = {}
        if cascade:
            for group, names in self.worst_case.items():
                for n in names:
                    if n in self.group_of:
                        raise ValueError(f"cascade: attack {n!r} is in two worst-case groups")
                    self.group_of[n] = group
        self.kinds = [CLEAN, *self.attacks, *self.worst_case]
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"attack and group names must be unique and not 'clean': {self.kinds}")
        # a ModuleList (not a ModuleDict): attack names like "pgd@8/255" are not valid keys
        self.metrics = nn.ModuleList(build_metrics(task, num_classes, per_class=per_class)
                                     for _ in self.kinds)
        self.losses = nn.ModuleList(MeanMetric() for _ in self.kinds)  # mean per-sample loss
        # share of images whose prediction the attack changed (single-label: the argmax;
        # multi-label: the set of predicted findings), as Xu et al. report beside accuracy
        self.fooling = nn.ModuleList(MeanMetric() for _ in self.kinds)
        self.n_images = SumMetric()
        self.seconds = nn.ModuleList(SumMetric() for _ in self.attacks)  # attack time
        self.attacked = nn.ModuleList(SumMetric() for _ in self.attacks)  # images attacked
        # image passes through the model (forward, backward) per attack, counted on the model
        self.passes = nn.ModuleList(SumMetric() for _ in range(2 * len(self.attacks)))
        # adversarial images outside the attack's ball or [0, 1] (must stay 0; honesty check)
        self.outside = nn.ModuleList(SumMetric() for _ in self.attacks)
        self.clean_predictions = PredictionCounts(num_classes) \
            if self.task.single_label else None

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               keep: torch.Tensor | None = None) -> EvalBatch:
        """Attack ``(x, y)`` (images in [0, 1]) with every attack and update every metric with
        the samples ``keep`` marks (``None`` = all; see the module docstring)."""
        out = self.attack_batch(model, x, y)
        self.record(out, y, keep)
        return out

    def attack_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> EvalBatch:
        """Clean, adversarial and worst-case logits of one batch, and each attack's cost."""
        with torch.no_grad():
            out = EvalBatch(clean=model(x))
        model = PassCounter(model)  # each attack's passes, third-party attacks' included
        running: dict[str, torch.Tensor] = {}  # cascade: worst logits of each group so far
        for name, attack in self.attacks.items():
            group = self.group_of.get(name)
            start, passes = _clock(x), model.counts()
            if group is None:
                x_adv = attack(model, x, y, self.task)
                with torch.no_grad():
                    out.adv[name] = model(x_adv)
                n_attacked = x.shape[0]
                out.outside[name] = int(attack.threat.outside(x_adv, x).sum())
            else:  # only the samples still robust in this group
                worst = running.get(group, out.clean)
                todo = (~self.task.wrong(worst, y)).nonzero().squeeze(1)
                logits = worst.clone()
                out.outside[name] = 0
                if todo.numel():
                    x_adv = attack(model, x[todo], y[todo], self.task)
                    with torch.no_grad():
                        logits[todo] = model(x_adv).to(logits.dtype)
                    out.outside[name] = int(attack.threat.outside(x_adv, x[todo]).sum())
                out.adv[name] = running[group] = worst_case_logits([worst, logits], y,
                                                                   self.task)
                n_attacked = todo.numel()
            out.seconds[name] = _clock(x) - start
            out.forward[name], out.backward[name] = (b - a for a, b in zip(passes, model.counts(),
                                                                       strict=True))
            out.attacked[name] = int(n_attacked) if attack.eps > 0 else 0  # eps 0: identity
        for group, names in self.worst_case.items():
            out.worst[group] = worst_case_logits([out.clean, *(out.adv[n] for n in names)], y,
                                                 self.task)
        return out

    def record(self, out: EvalBatch, y: torch.Tensor, keep: torch.Tensor | None = None
               ) -> None:
        """Update every metric and cost from one batch's logits (fresh, or a saved batch of
        an interrupted evaluation); samples outside ``keep`` (``None`` = all) count in no
        metric, only in the cost."""
        device = out.clean.device
        for i, (name, secs, count) in enumerate(zip(self.attacks, self.seconds, self.attacked,
                                                    strict=True)):
            secs.update(torch.tensor(out.seconds[name], dtype=torch.float64, device=device))
            count.update(torch.tensor(float(out.attacked[name]), device=device))
            for j, kind in enumerate((out.forward, out.backward)):
                self.passes[2 * i + j].update(torch.tensor(float(kind.get(name, 0)),
                                                           dtype=torch.float64, device=device))
            self.outside[i].update(torch.tensor(float(out.outside.get(name, 0)),
                                                dtype=torch.float64, device=device))
        logits = {CLEAN: out.clean, **out.adv, **out.worst}
        if keep is not None:
            keep = keep.to(device=device, dtype=torch.bool)
            if keep.shape != y.shape[:1]:
                raise ValueError(f"keep mask of shape {tuple(keep.shape)} for a batch of "
                                 f"{y.shape[0]}")
            if not keep.any():
                return
            logits = {k: v[keep] for k, v in logits.items()}
            y = y[keep]
        target = y.long()
        clean_pred = predictions(logits[CLEAN], self.task)
        for kind, coll, loss, fool in zip(self.kinds, self.metrics, self.losses, self.fooling,
                                          strict=True):
            coll.update(logits[kind].float(), target)
            loss.update(self.task.loss(logits[kind], y).detach())
            if kind != CLEAN:
                changed = predictions(logits[kind], self.task) != clean_pred
                fool.update((changed if changed.dim() == 1 else changed.any(dim=1)).float())
        self.n_images.update(torch.tensor(float(y.shape[0]), device=device))
        if self.clean_predictions is not None:
            self.clean_predictions.update(logits[CLEAN])

    def compute(self, class_names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """``{kind: {metric: value}}`` for ``clean``, each attack and each worst-case group,
        with the mean per-sample ``loss`` (reduced across ranks, on every rank alike: call it
        on all ranks); kinds with no update are left out."""
        return {kind: {**scalar_metrics(coll.compute(), class_names),
                       "loss": float(loss.compute()),
                       **({"fooling_rate": float(fool.compute())} if fool.update_count else {})}
                for kind, coll, loss, fool in zip(self.kinds, self.metrics, self.losses,
                                                  self.fooling, strict=True)
                if any(m.update_count > 0 for m in coll.values())}

    def cost(self) -> dict[str, dict[str, float]]:
        """``{attack: {"seconds", "images_attacked", "images_per_s", "forward_passes",
        "backward_passes", "outside_threat_model"}}`` since the last reset, summed across ranks (call on all ranks):
        what each attack cost (passes: images through the model, its final forward included),
        and with the cascade how many images it skipped."""
        out = {}
        for i, (name, secs, count) in enumerate(zip(self.attacks, self.seconds, self.attacked,
                                                    strict=True)):
            if not count.update_count:
                continue
            s, n = float(secs.compute()), int(count.compute())
            fwd, bwd = (int(self.passes[2 * i + j].compute()) for j in (0, 1))
            out[name] = {"seconds": round(s, 3), "images_attacked": n,
                         "images_per_s": round(n / s, 2) if s > 0 else None,
                         "forward_passes": fwd, "backward_passes": bwd,
                         "outside_threat_model": int(self.outside[i].compute())}
        return out

    def count(self) -> int:
        """Images seen since the last reset (all ranks)."""
        return int(self.n_images.compute().item()) if self.n_images.update_count else 0

    def predicted_counts(self) -> torch.Tensor | None:
        """Clean predictions per class since the last reset (all ranks); single-label only."""
        if self.clean_predictions is None or not self.clean_predictions.update_count:
            return None
        return self.clean_predictions.compute()

    def reset(self) -> None:
        for coll, loss, fool in zip(self.metrics, self.losses, self.fooling, strict=True):
            coll.reset()
            loss.reset()
            fool.reset()
        self.n_images.reset()
        for m in (*self.seconds, *self.attacked, *self.passes, *self.outside):
            m.reset()
        if self.clean_predictions is not None:
            self.clean_predictions.reset()
