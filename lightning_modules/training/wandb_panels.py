"""wandb dashboards of a training run (``logger=wandb``).

``AdversarialExamplesTable``, a Lightning callback that ``conf/logger/wandb.yaml`` mounts as
``callbacks.wandb_examples``: a fixed set of validation images, spread over the split, is
attacked with the module's own validation attack and logged as the ``wandb.Table``
``examples/adversarial`` at the first validation epoch, every ``every_n_epochs`` epochs if set,
and at the end of training (the final weights). One row per image: epoch, its index in the
validation split, the clean image, the adversarial image, the perturbation amplified to be
visible (mid-grey is no change; the largest change of that image is black or white; ``gain``
says by how much it was multiplied), the label, and the clean and adversarial predictions
(class names; the findings present for multi-label).
It runs on every DDP rank (the same images, so every rank takes the same collective calls)
and logs on rank 0; parameters, modes and BatchNorm statistics are restored by the attack's
``attack_mode``. A run whose fit raises is finished as failed (exit code 1).

``group_runs_by_sweep(cfg)``: in a Hydra multirun, wandb loggers without a group get the sweep
folder's name, so the runs of one sweep form one group in the dashboard.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict

from lightning_modules.attacks import attack_mode
from lightning_modules.core.tasks import Task
from lightning_modules.core.tensors import to_memory_format
from lightning_modules.evaluation.engine import predictions

__all__ = ["COLUMNS", "AdversarialExamplesTable", "adversarial_examples",
           "group_runs_by_sweep"]

COLUMNS = ["epoch", "index", "clean", "adversarial", "perturbation", "gain", "label",
           "clean_pred", "adv_pred"]


def _names(target: torch.Tensor, class_names: list[str], single_label: bool) -> str:
    if single_label:
        return class_names[int(target)]
    found = [class_names[i] for i in torch.nonzero(target > 0.5).flatten().tolist()]
    return ", ".join(found) or "none"


def _hwc(image: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, C)`` float array (``(H, W)`` for one channel)."""
    arr = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    return arr[..., 0] if arr.shape[2] == 1 else arr


def adversarial_examples(net: torch.nn.Module, attack, task: Task, x: torch.Tensor,
                         y: torch.Tensor, class_names: list[str]) -> list[dict]:
    """Attack ``(x, y)`` (images in [0, 1]) with ``attack``; one dict per image with the
    :data:`COLUMNS` but ``epoch``: images as float arrays in [0, 1], the label and the
    predictions as ``class_names`` (multi-label: the findings present, comma-separated)."""
    x_adv = attack(net, x, y, task)
    with torch.no_grad(), attack_mode(net, "eval"):
        pred_clean = predictions(net(x), task).cpu()
        pred_adv = predictions(net(x_adv), task).cpu()
    delta = (x_adv - x).float()
    rows = []
    for i in range(x.shape[0]):
        peak = float(delta[i].abs().max())
        gain = 0.5 / peak if peak > 0 else 0.0
        rows.append({
            "index": i,
            "clean": _hwc(x[i].clamp(0, 1)),
            "adversarial": _hwc(x_adv[i].clamp(0, 1)),
            "perturbation": _hwc((0.5 + delta[i] * gain).clamp(0, 1)),
            "gain": round(gain, 2),
            "label": _names(y[i].cpu(), class_names, task.single_label),
            "clean_pred": _names(pred_clean[i], class_names, task.single_label),
            "adv_pred": _names(pred_adv[i], class_names, task.single_label),
        })
    return rows


def _uint8(arr: np.ndarray) -> np.ndarray:
    return np.rint(arr * 255).astype(np.uint8)  # exact pixels, no guessing by wandb.Image


class AdversarialExamplesTable(Callback):
    """Args:
        n_images: images per table (spread evenly over the validation split).
        every_n_epochs: also log every this many epochs; 0 = only the first validation epoch
            and the end of training.
        key: the wandb key of the table.
    """

    def __init__(self, n_images: int, every_n_epochs: int, key: str) -> None:
        if n_images < 1 or every_n_epochs < 0:
            raise ValueError(f"n_images={n_images} must be >= 1 and every_n_epochs="
                             f"{every_n_epochs} >= 0")
        self.n_images, self.every_n_epochs, self.key = int(n_images), int(every_n_epochs), key
        self.logged_epochs: list[int] = []
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._indices: list[int] = []  # positions of those images in the validation split

    @staticmethod
    def _wandb(trainer: L.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._wandb(trainer) is None or trainer.datamodule is None:
            return  # no wandb logger: nothing to draw
        dataset = trainer.datamodule.val_dataloader().dataset
        picks = np.linspace(0, len(dataset) - 1, num=min(self.n_images, len(dataset)))
        self._indices = [int(i) for i in np.unique(np.rint(picks))]
        items = [dataset[i] for i in self._indices]
        self._batch = (torch.stack([torch.as_tensor(x) for x, _ in items]),
                       torch.stack([torch.as_tensor(y) for _, y in items]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if not self.logged_epochs or (self.every_n_epochs and
                                      (epoch + 1) % self.every_n_epochs == 0):
            self.log_table(trainer, pl_module, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch - 1  # the final weights are those of the last epoch
        if last >= 0 and last not in self.logged_epochs:
            self.log_table(trainer, pl_module, last)

    def log_table(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        logger = self._wandb(trainer)
        if logger is None or self._batch is None:
            return
        import wandb

        x, y = (t.to(pl_module.device) for t in self._batch)
        names = pl_module.hparams.get("class_names") or \
            [str(i) for i in range(pl_module.hparams.num_classes)]
        rows = adversarial_examples(pl_module.net, pl_module.val_attack, pl_module.task,
                                    to_memory_format(x, pl_module.memory_format), y, names)
        self.logged_epochs.append(epoch)
        if not trainer.is_global_zero:
            return  # attacked on every rank (the same collectives everywhere), logged on one
        for row, index in zip(rows, self._indices, strict=True):
            row["index"] = index  # the image's position in the validation split
        data = [[epoch, *(wandb.Image(_uint8(r[c])) if isinstance(r[c], np.ndarray) else r[c]
                          for c in COLUMNS[1:])] for r in rows]
        logger.log_table(self.key, columns=COLUMNS, data=data, step=trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        import wandb

        if trainer.is_global_zero and wandb.run is not None:
            wandb.finish(exit_code=1)  # shown as failed; train.py's finally finds no open run

    def state_dict(self) -> dict:
        return {"logged_epochs": list(self.logged_epochs)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.logged_epochs = list(state_dict.get("logged_epochs", []))


def group_runs_by_sweep(cfg: DictConfig) -> None:
    """In a Hydra multirun: ``logger.<name>.group`` of every wandb logger that has none becomes
    the sweep folder's name (``logs/<task>/multiruns/<time>`` -> ``<time>``)."""
    from hydra.core.hydra_config import HydraConfig

    name = Path(HydraConfig.get().sweep.dir).name
    for node in (cfg.get("logger") or {}).values():
        if str(node.get("_target_", "")).endswith("WandbLogger") and not node.get("group"):
            with open_dict(node):
                node.group = name
