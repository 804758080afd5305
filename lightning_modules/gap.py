"""Fitting a GAP generator (:mod:`.attacks.gap`) against a frozen classifier: a Lightning fit
of its own, and the saved file that later evaluations reuse.

:class:`GAPModule` orchestrates; the generator, the rescaling and the objective are plain
PyTorch in :mod:`.attacks.gap`. The classifier is frozen (no gradients to its weights, eval
mode throughout, so BatchNorm statistics never move); only the generator learns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from .attacks.gap import GAP, gap_loss
from .tasks import Task

__all__ = ["GAPModule", "fit_generator", "load_generator", "save_generator"]


class GAPModule(L.LightningModule):
    """Args:
        attack: the GAP attack (radius, norm, learning rate).
        generator: the generator to fit.
        classifier: the trained network (images in [0, 1] -> logits); frozen.
        task: ``multiclass`` or ``multilabel``.
    """

    def __init__(self, attack: GAP, generator: nn.Module, classifier: nn.Module,
                 task: str) -> None:
        super().__init__()
        self.attack = attack
        self.generator = generator
        self.classifier = classifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.task = Task(task)

    def _freeze(self) -> None:
        self.classifier.eval()

    def on_train_start(self) -> None:
        self._freeze()

    def on_train_epoch_start(self) -> None:  # Lightning puts every submodule in train mode
        self._freeze()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            clean = self.classifier(x)
        loss = gap_loss(self.classifier(self.attack.apply(self.generator, x)), clean,
                        self.task).mean()
        self.log("gap/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.generator.parameters(), lr=self.attack.lr,
                                betas=(0.5, 0.999))


def save_generator(path: Path, generator: nn.Module, attack: GAP, meta: dict[str, Any],
                   against: dict[str, Any] | None = None) -> None:
    """Tensors and plain values only (loads with ``weights_only=True``), written atomically;
    ``against`` names the classifier it was fitted on (checked when loading)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": generator.state_dict(),
                "signature": {**attack.signature(), **(against or {})}, "meta": meta}, tmp)
    tmp.replace(path)


def load_generator(path: Path, attack: GAP, in_chans: int, image_size: int,
                   against: dict[str, Any] | None = None) -> tuple[nn.Module, dict] | None:
    """The saved generator if ``path`` holds one of this attack's settings fitted against the
    same classifier (``against``), else ``None``."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("signature") != {**attack.signature(), **(against or {})}:
        return None
    generator = attack.new_generator(in_chans, image_size)
    generator.load_state_dict(saved["state_dict"])
    return generator, saved.get("meta", {})


def fit_generator(attack: GAP, classifier: nn.Module, task: str, datamodule: L.LightningDataModule,
                  trainer: L.Trainer, in_chans: int, image_size: int
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Fit a fresh generator on the datamodule's training split with ``trainer`` (built with
    no validation); returns it (eval mode) and what the fit cost."""
    generator = attack.new_generator(in_chans, image_size)
    flags = [p.requires_grad for p in classifier.parameters()]
    module = GAPModule(attack, generator, classifier, task)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:  # the classifier leaves as it came
        for p, flag in zip(classifier.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        classifier.eval()
    loss = trainer.callback_metrics.get("gap/loss_epoch")
    generator.eval()
    return generator, {"fit_seconds": round(time.perf_counter() - start, 2),
                       "epochs": attack.epochs, "final_loss": None if loss is None
                       else float(loss), "trained_at_eps": attack.eps}
