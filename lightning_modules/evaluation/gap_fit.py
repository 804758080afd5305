"""Fitting a GAP generator (:mod:`.attacks.gap`) against a frozen classifier: a Lightning fit
of its own, and the saved file that later evaluations reuse.

:class:`GAPModule` orchestrates; the generator, the rescaling and the objective are plain
PyTorch in :mod:`.attacks.gap`. The classifier is frozen (no gradients to its weights, eval
mode throughout, so BatchNorm statistics never move); only the generator learns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from lightning_modules.attacks.gap import GAP, gap_loss
from lightning_modules.core.config import instantiate_node
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tasks import Task

__all__ = ["prepare_gap", "GAPModule", "fit_generator", "load_generator", "save_generator"]

log = logging.getLogger(__name__)


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


def prepare_gap(cfg: DictConfig, attacks: dict, net, task: str, train_cfg: DictConfig,
                datamodule, out_dir: Path, ckpt: dict) -> dict[str, dict]:
    """Give every GAP attack its generator: loaded from ``path`` (or the default file beside
    the report) when one of the same settings was saved, else fitted on the training split
    (a Lightning fit, same ``trainer`` config) and saved there. Returns what happened."""
    info = {}
    for name, atk in list(attacks.items()):
        if not isinstance(atk, GAP) or atk.generator is not None:
            continue
        datamodule.prepare_data()
        datamodule.setup("fit")
        chans = getattr(datamodule, "in_chans", None) or train_cfg.datamodule.get("in_chans")
        size = train_cfg.datamodule.get("image_size")
        if not (chans and size):
            x, _ = next(iter(datamodule.train_dataloader()))
            chans, size = x.shape[1], x.shape[-1]
        digest = hashlib.sha1(json.dumps(atk.signature(), sort_keys=True).encode()).hexdigest()
        path = Path(atk.path).expanduser() if atk.path else out_dir / f"gap-{name}-{digest[:8]}.pt"
        # a generator is reused only against the checkpoint it was fitted on
        against = {"checkpoint": str(Path(cfg.ckpt_path).resolve()),
                   "global_step": ckpt.get("global_step")}
        loaded = load_generator(path, atk, int(chans), int(size), against)
        if loaded is None and atk.path:
            raise ConfigError(f"attacks.{name}.path={atk.path!r}: no saved GAP generator with "
                              f"these settings {atk.signature()} there")
        if loaded is not None:
            generator, meta = loaded
            info[name] = {"path": str(path), "reused": True, **meta}
        else:
            log.info("fitting the GAP generator %s on the training split (%d epochs)", name,
                     atk.epochs)
            fit_trainer = instantiate_node(
                cfg, "trainer", logger=False, callbacks=[], enable_checkpointing=False,
                max_epochs=atk.epochs, limit_train_batches=atk.max_batches or 1.0,
                limit_val_batches=0, num_sanity_val_steps=0)
            generator, meta = fit_generator(atk, net, task, datamodule, fit_trainer,
                                            int(chans), int(size))
            if fit_trainer.is_global_zero:
                save_generator(path, generator, atk, meta, against)
            info[name] = {"path": str(path), "reused": False, **meta}
        attacks[name] = atk.with_generator(generator.to(next(net.parameters()).device))
    return info
