"""FGSM-PGI: fast adversarial training with a prior-guided initialisation (Jia et al., ECCV 2022,
"Prior-Guided Adversarial Initialization for Fast Adversarial Training"; the FGSM-MEP variant,
whose prior is the momentum of the sample's gradients over the previous epochs).

Per training image ``i`` the defense keeps a perturbation prior ``delta_i`` and a gradient
momentum ``m_i`` across epochs (random ``alpha * sign(U(-eps, eps))`` and 0 at the start, and
again every ``reset_every`` epochs). For a batch, with ``P`` the projection onto the L-inf
ball of radius ``eps`` followed by the clip that keeps ``x + delta`` in [0, 1] (units: [0, 1]
pixels)::

    z0      = f(x + delta_i)                          (the training forward pass at the prior)
    g       = grad_delta l(z0, y)                     (l: the per-sample task loss)
    delta'  = P(delta_i + alpha * sign(g))            (one FGSM step from the prior)
    m_i     <- mu * m_i + g / ||g||_1                 (per-sample L1 norm)
    delta_i <- P(delta_i + alpha * sign(m_i))         (the prior of the next epoch)
    L       = mean_i l(f(x + delta'), y) + lambda * mean((f(x + delta') - z0)^2)

The last term is the prior-guided regulariser: the logits at the adversarial point must stay
close to those at the initialisation (both forward passes carry gradients). Two forward and
two backward passes per batch, as FGSM with a random start plus one forward. L-inf only.
The priors are per training image: the datamodule hands the sample indices with each batch
(``needs_index``), and they are kept in the checkpoint (``state_dict``), so a resumed run
continues with the same priors. Under DDP each rank updates the rows of the images it sees and
at the end of every epoch the ranks exchange them (one all-reduce of the priors, the momenta and
a mask of the rows each rank touched), so an image that changes rank keeps its prior. Memory: two
float tensors of the training set's size (7,000 HAM10000 images at 32 px: 172 MB, also in
every checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.core.tasks import Task, as_task
from lightning_modules.core.threat import parse_eps
from lightning_modules.defenses.base import Defense, DefenseOutput

__all__ = ["FGSMPGI"]


class FGSMPGI(Defense):
    """FGSM-PGI (FGSM-MEP) adversarial training; see the module docstring.

    Args:
        eps: L-inf radius in [0, 1] pixel units.
        norm: must be ``linf``.
        step_size_rel: ``alpha = step_size_rel * eps`` (the paper: 1).
        momentum: ``mu`` of the gradient momentum (the paper: 0.3).
        reg_weight: ``lambda`` of the regulariser (the paper: 10).
        reset_every: re-draw every prior and zero every momentum every this many epochs
            (``None``: never).
        name: label for logs and reports.
    """

    needs_index = True
    tasks = ("multiclass", "multilabel")

    def __init__(self, eps: float | str, norm: str, step_size_rel: float, momentum: float,
                 reg_weight: float, reset_every: int | None, name: str) -> None:
        if norm != "linf":
            raise ValueError(f"defense=fgsm_pgi supports threat.norm=linf only, got {norm!r}")
        self.eps = parse_eps(eps)
        if step_size_rel <= 0 or not 0 <= momentum <= 1 or reg_weight < 0:
            raise ValueError(f"defense=fgsm_pgi: step_size_rel={step_size_rel} must be > 0, "
                             f"momentum={momentum} in [0, 1], reg_weight={reg_weight} >= 0")
        if reset_every is not None and int(reset_every) < 1:
            raise ValueError(f"defense.reset_every={reset_every} must be >= 1 or null")
        self.step_size_rel, self.momentum = float(step_size_rel), float(momentum)
        self.reg_weight = float(reg_weight)
        self.reset_every = None if reset_every is None else int(reset_every)
        self.name = name
        self.prior: torch.Tensor | None = None      # (N, C, H, W) on the images' device
        self.grad_momentum: torch.Tensor | None = None
        self.fresh: torch.Tensor | None = None      # (N,) bool: prior not drawn yet
        self.touched: torch.Tensor | None = None    # (N,) bool: rows updated this epoch
        self.num_samples = 0

    # ------------------------------------------------------------------------ state
    def on_train_epoch_start(self, epoch: int, num_samples: int = 0) -> None:
        """Every ``reset_every`` epochs (from epoch 0) the priors start over;
        ``num_samples``: the training set's size (the storage's rows)."""
        self.num_samples = max(self.num_samples, int(num_samples))
        if self.reset_every and epoch % self.reset_every == 0 and self.fresh is not None:
            self.fresh.fill_(True)
        if self.touched is not None:
            self.touched.fill_(False)

    def on_train_epoch_end(self) -> None:
        """Under DDP: every rank takes the rows the other ranks updated this epoch."""
        import torch.distributed as dist

        if self.prior is None or not (dist.is_available() and dist.is_initialized()) \
                or dist.get_world_size() == 1:
            return
        mine = self.touched.to(self.prior.dtype).view(-1, *[1] * (self.prior.dim() - 1))
        count = self.touched.to(self.prior.dtype)
        sums = [self.prior * mine, self.grad_momentum * mine, count, (~self.fresh).to(count)]
        for t in sums:
            dist.all_reduce(t)
        seen = sums[2] > 0
        share = sums[2].clamp_min(1).view_as(mine)
        self.prior[seen] = (sums[0] / share)[seen]
        self.grad_momentum[seen] = (sums[1] / share)[seen]
        self.fresh &= ~(sums[3] > 0)

    def state_dict(self) -> dict:
        if self.prior is None:
            return {}
        return {"prior": self.prior.cpu(), "momentum": self.grad_momentum.cpu(),
                "fresh": self.fresh.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.prior, self.grad_momentum, self.fresh = \
                state["prior"], state["momentum"], state["fresh"]
            self.touched = torch.zeros_like(self.fresh)

    def _rows(self, index: torch.Tensor, like: torch.Tensor) -> None:
        """Storage for every index seen so far (grown on demand, on ``like``'s device)."""
        # the training set's size when the module gave it (no device sync), else the batch's
        need = self.num_samples or int(index.max()) + 1
        have = 0 if self.prior is None else self.prior.shape[0]
        if self.prior is not None and self.prior.device != like.device:
            self.prior, self.grad_momentum, self.fresh, self.touched = (
                t.to(like.device) for t in (self.prior, self.grad_momentum, self.fresh,
                                            self.touched))
        if need > have:
            extra = (need - have, *like.shape[1:])
            flags = torch.ones(need - have, dtype=torch.bool, device=like.device)
            grow = [like.new_zeros(extra), like.new_zeros(extra), flags, ~flags]
            if self.prior is None:
                self.prior, self.grad_momentum, self.fresh, self.touched = grow
            else:
                self.prior, self.grad_momentum, self.fresh, self.touched = (
                    torch.cat([old, g]) for old, g in zip(
                        (self.prior, self.grad_momentum, self.fresh, self.touched), grow,
                        strict=True))

    # ------------------------------------------------------------------------ the step
    def _project(self, delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        return (x + delta.clamp(-eps, eps)).clamp(0.0, 1.0) - x

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | str,
                 eps_scale: float = 1.0, index: torch.Tensor | None = None) -> DefenseOutput:
        if index is None:
            raise ValueError("defense=fgsm_pgi needs the sample indices of each training "
                             "batch (the datamodule gives them when the defense asks)")
        task = as_task(task)
        eps = self.eps * eps_scale
        alpha = self.step_size_rel * eps
        index = index.to(x.device).long()
        self._rows(index, x)
        # first use since the start or a reset: alpha * sign(U(-eps, eps)) and no momentum
        # (drawn for the whole batch and selected on the device: no host sync per batch)
        new = self.fresh[index].view(-1, *[1] * (x.dim() - 1))
        draw = (alpha * torch.empty_like(x).uniform_(-eps, eps).sign()).clamp(-eps, eps)
        prior = torch.where(new, draw, self.prior[index])
        momentum = torch.where(new, torch.zeros_like(x), self.grad_momentum[index])
        self.fresh[index] = False
        delta0 = self._project(prior, x, eps).requires_grad_(True)
        logits0 = model(x + delta0)
        (grad,) = torch.autograd.grad(task.loss(logits0, y).sum(), delta0, retain_graph=True)
        with torch.no_grad():
            delta_adv = self._project(delta0 + alpha * grad.sign(), x, eps)
            l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            m = self.momentum * momentum + grad / l1
            self.grad_momentum[index] = m
            self.prior[index] = self._project(delta0 + alpha * m.sign(), x, eps)
            self.touched[index] = True
        logits_adv = model(x + delta_adv)
        loss = task.loss(logits_adv, y).mean() + \
            self.reg_weight * (logits_adv.float() - logits0.float()).pow(2).mean()
        return DefenseOutput(loss=loss, logits_adv=logits_adv)

    def describe(self) -> dict:
        return {"defense": self.name, "eps": self.eps, "step_size": self.step_size_rel * self.eps,
                "momentum": self.momentum, "reg_weight": self.reg_weight,
                "reset_every": self.reset_every}
