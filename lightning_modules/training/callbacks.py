"""Lightning callbacks for adversarial training.

``CatastrophicOverfittingMonitor``: single-step adversarial training (FGSM, fast AT) can
collapse within one epoch: PGD accuracy falls to about zero while FGSM accuracy climbs
(Wong, Rice & Kolter, ICLR 2020; Andriushchenko & Flammarion, NeurIPS 2020). After every
training epoch this callback measures PGD and FGSM accuracy on a fixed validation batch; when
PGD accuracy drops by ``min_drop`` or more below its best so far, it warns and, by ``action``,
stops training (``stop``) or restores the last good weights and stops (``restore``; with weight
averaging the average of that epoch is restored too, and it is what training ends with); ``warn``
only warns. The attacks have no random start, and the accuracies are averaged over DDP ranks, so every
rank reaches the same verdict (a rank stopping alone would leave the others waiting).

``TrainClock``: the wall time spent training (validation and sanity checks left out), logged as
``time/train_s`` at every validation, cumulative across a resume: the x axis of
``benchmarks/bench_time_to_robustness.py``.
"""

from __future__ import annotations

import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_modules.attacks.config import attack_from_config
from lightning_modules.core.tensors import to_memory_format

__all__ = ["CatastrophicOverfittingMonitor", "TrainClock"]

ACTIONS = ("warn", "stop", "restore")


def _average_model(trainer: L.Trainer) -> torch.nn.Module | None:
    """The ``AveragedModel`` of the run's weight averaging, if any (after its first update)."""
    from lightning_modules.training.averaging import WeightAveraging

    cb = next((c for c in trainer.callbacks if isinstance(c, WeightAveraging)), None)
    return None if cb is None else cb.averaged_model()


class CatastrophicOverfittingMonitor(Callback):
    """Args:
        eps: attack radius in [0, 1] pixel units; ``None`` = the module's validation attack eps.
        pgd_steps: PGD steps (step 2.5 eps / steps, no random start).
        n_samples: size of the fixed validation batch.
        min_drop: absolute drop of PGD accuracy from its best that counts as a collapse.
        action: ``warn``, ``stop`` or ``restore``.
    """

    def __init__(self, eps: float | str | None, pgd_steps: int, n_samples: int, min_drop: float,
                 action: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"callbacks.co_monitor.action={action!r} must be one of {ACTIONS}")
        if not 0 < min_drop <= 1:
            raise ValueError(f"callbacks.co_monitor.min_drop={min_drop} must be in (0, 1]")
        self.eps, self.pgd_steps, self.n_samples = eps, int(pgd_steps), int(n_samples)
        self.min_drop, self.action = float(min_drop), action
        self.best_pgd_acc = -1.0
        self.good_state: dict | None = None
        self.good_average: dict | None = None  # the weight average's state at good_epoch
        self.good_epoch: int | None = None
        self.collapsed_epoch: int | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        xs, ys, n = [], [], 0
        for x, y in trainer.datamodule.val_dataloader():
            xs.append(x)
            ys.append(y)
            n += x.shape[0]
            if n >= self.n_samples:
                break
        if not xs:
            raise ValueError("CatastrophicOverfittingMonitor: the validation split is empty")
        self._batch = (torch.cat(xs)[: self.n_samples], torch.cat(ys)[: self.n_samples])
        val_attack = pl_module.val_attack
        eps = val_attack.eps if self.eps is None else self.eps
        self.pgd = attack_from_config("pgd", eps=eps, steps=self.pgd_steps, norm=val_attack.norm, random_start=False)
        self.fgsm = attack_from_config("fgsm", eps=eps, norm=val_attack.norm)

    def measure(self, pl_module: L.LightningModule) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) of the current weights on the fixed batch."""
        x, y = (t.to(pl_module.device) for t in self._batch)
        x = to_memory_format(x, pl_module.memory_format)  # as the module's own batches
        net, task = pl_module.net, pl_module.task
        accs = []
        with torch.enable_grad():
            for atk in (self.pgd, self.fgsm):
                x_adv = atk(net, x, y, task)
                with torch.no_grad():
                    was_training = net.training
                    net.eval()
                    wrong = task.wrong(net(x_adv), y)
                    net.train(was_training)
                accs.append(1.0 - wrong.float().mean().item())
        return accs[0], accs[1]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pgd_acc, fgsm_acc = self.measure(pl_module)
        if trainer.world_size > 1:  # one verdict on every rank, even if GPU kernels differ
            accs = trainer.strategy.reduce(torch.tensor([pgd_acc, fgsm_acc],
                                                        device=pl_module.device), reduce_op="mean")
            pgd_acc, fgsm_acc = (float(a) for a in accs)
        pl_module.log("co/pgd_acc", pgd_acc)
        pl_module.log("co/fgsm_acc", fgsm_acc)
        if not getattr(pl_module.defense, "adversarial", True):
            return  # no adversarial training (defense=none): falling PGD accuracy is expected
        if pgd_acc >= self.best_pgd_acc:
            self.best_pgd_acc = pgd_acc
            self.good_epoch = trainer.current_epoch
            if self.action == "restore":
                self.good_state = {k: v.detach().clone()
                                   for k, v in pl_module.state_dict().items()}
                average = _average_model(trainer)  # weight averaging: its average too
                self.good_average = None if average is None else {
                    k: v.detach().clone() for k, v in average.state_dict().items()}
            return
        if self.best_pgd_acc - pgd_acc < self.min_drop or self.collapsed_epoch is not None:
            return
        self.collapsed_epoch = trainer.current_epoch
        msg = (f"catastrophic overfitting at epoch {trainer.current_epoch}: PGD accuracy "
               f"{pgd_acc:.3f} (best {self.best_pgd_acc:.3f} at epoch {self.good_epoch}), "
               f"FGSM accuracy {fgsm_acc:.3f}")
        if self.action == "restore" and self.good_state is not None:
            pl_module.load_state_dict(self.good_state)
            average = _average_model(trainer)
            if average is not None and self.good_average is not None:
                average.load_state_dict(self.good_average)
            msg += f"; restored the weights of epoch {self.good_epoch} and stopped"
            trainer.should_stop = True
        elif self.action in ("stop", "restore"):
            msg += "; stopped"
            trainer.should_stop = True
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict:
        return {"best_pgd_acc": self.best_pgd_acc, "good_epoch": self.good_epoch,
                "collapsed_epoch": self.collapsed_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_pgd_acc = state_dict.get("best_pgd_acc", -1.0)
        self.good_epoch = state_dict.get("good_epoch")
        self.collapsed_epoch = state_dict.get("collapsed_epoch")


class TrainClock(Callback):
    """Cumulative training wall time in seconds (``time/train_s``), validation excluded."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = None

    def _pause(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule
                                  ) -> None:
        self._pause()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # each rank's own clock, not reduced (the logger writes rank 0's)
        pl_module.log("time/train_s", self.seconds)
        self._since = time.perf_counter()  # training goes on (mid-epoch validation)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = float(state_dict.get("seconds", 0.0))
