"""Common loader plumbing: a datamodule that holds one dataset per split, class-balance helpers."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    Sampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from lightning_modules.core.errors import ConfigError

from .augment import seed_worker
from .dataset import skip_none_collate
from .splits import stratified_subset

__all__ = ["SplitDataModule", "SAMPLERS", "ShardSampler", "sample_weights",
           "balanced_class_weights"]

SAMPLERS = (None, "weighted")


def _counts(targets: np.ndarray, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return np.bincount(targets.astype(np.int64), minlength=num_classes).astype(np.float64)
    return (targets > 0).sum(axis=0).astype(np.float64)


class WithIndex(Dataset):
    """``(*sample, i)`` for sample ``i`` of ``dataset`` (``None`` stays ``None``: unreadable)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (*item, i)


def sample_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weights that make every class equally likely under a weighted sampler.

    Single-label: ``1 / count(y)``. Multi-label: ``1 / count`` of the sample's rarest positive
    finding (``1 / count(no finding)`` for all-negative samples), so rare findings are seen
    about as often as common ones.
    """
    targets = np.asarray(targets)
    counts = _counts(targets, num_classes)
    if targets.ndim == 1:
        return 1.0 / counts[targets.astype(np.int64)]
    pos = targets > 0
    rarest = np.where(pos, counts[None, :], np.inf).min(axis=1)
    n_none = max(1, int((~pos.any(axis=1)).sum()))
    rarest[np.isinf(rarest)] = n_none
    return 1.0 / rarest


def balanced_class_weights(targets: np.ndarray, num_classes: int, max_weight: float = 100.0
                           ) -> list[float]:
    """Loss weights from training-label counts.

    Single-label: ``N / (K * n_c)`` per class, ``K`` the classes present (scikit-learn's
    "balanced": the mean weight over training samples is 1; absent classes get 0).
    Multi-label: BCE ``pos_weight`` ``n_negative / n_positive`` per finding (1 when a finding
    has no positives). Both are capped at ``max_weight``.
    """
    targets = np.asarray(targets)
    counts = _counts(targets, num_classes)
    if targets.ndim == 1:
        present = max(1, int((counts > 0).sum()))
        w = np.where(counts > 0, len(targets) / (present * np.maximum(counts, 1)), 0.0)
    else:
        w = np.where(counts > 0, (len(targets) - counts) / np.maximum(counts, 1), 1.0)
    return [float(v) for v in np.minimum(w, max_weight)]


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...``: across ranks every sample
    exactly once. Unlike ``DistributedSampler`` nothing is padded with duplicates, so ranks may
    get one sample (and one batch) more or less; fine for evaluation without per-step
    collectives (``evaluate.py``), not for training."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SplitDataModule(L.LightningDataModule):
    """Subclasses fill ``self.datasets`` (``train``/``val``/``test``) in ``setup``, implement
    :meth:`targets` and save ``batch_size``, ``eval_batch_size``, ``num_workers``,
    ``pin_memory`` and (optionally) ``sampler`` as hparams.

    ``sampler: weighted`` draws training samples with replacement so that every class (or,
    multi-label, every sample's rarest finding) is equally likely; an epoch keeps its length.
    """

    num_classes: int
    task: str

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}
        # evaluate.py sets this (with Trainer(use_distributed_sampler=False)): val/test loaders
        # are sharded across DDP ranks without the padding duplicates of DistributedSampler
        self.shard_eval = False
        # set by build() when the defense keeps per-image state (defense.needs_index): training
        # batches are then (x, y, training-set indices)
        self.train_index = False

    def targets(self, split: str) -> np.ndarray:
        """Labels of ``split``: ``(N,)`` class indices or ``(N, K)`` multi-hot."""
        raise NotImplementedError

    def class_counts(self, split: str) -> dict[str, int]:
        """Images per class (multi-label: positives per finding) in ``split``."""
        counts = _counts(self.targets(split), self.num_classes)
        names = list(getattr(self, "class_names", None) or range(self.num_classes))
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}

    def class_weights(self, spec) -> list[float] | None:
        """``module.class_weights``: ``None``, ``"balanced"`` (from the training labels,
        :func:`balanced_class_weights`) or a list of weights."""
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec != "balanced":
                raise ConfigError(f"module.class_weights={spec!r} must be null, 'balanced' or "
                                  "a list")
            return balanced_class_weights(self.targets("train"), self.num_classes)
        return [float(w) for w in spec]

    def take_subset(self, split: str, n, seed: int) -> int | None:
        """Keep a seeded class-stratified random ``n`` images of ``split`` (not the first
        ``n``: files are often sorted by class). Returns the split's size before, or ``None``
        (``n`` is ``None``: the whole split)."""
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"subset={n!r} must be a positive number of images or null")
        self.prepare_data()
        self.setup("test" if split == "test" else "validate")
        ds = self.datasets[split]
        labels = getattr(ds, "targets", None)  # what the dataset holds (after skipped images)
        if labels is None:
            labels = ds.tensors[1] if isinstance(ds, TensorDataset) else self.targets(split)
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        keep = stratified_subset(labels, n, seed)
        self.datasets[split] = Subset(ds, keep.tolist())
        return len(labels)

    def sample_loader(self, split: str, batch_size: int, n: int | None = None,
                      seed: int = 0) -> DataLoader:
        """A plain loader over ``split`` (set up), or over a seeded random ``n`` of its
        images: for the analyses and the corruption benchmark of ``evaluate.py``."""
        ds = self.datasets[split]
        if n:
            gen = torch.Generator().manual_seed(seed)
            ds = Subset(ds, torch.randperm(len(ds), generator=gen)[:int(n)].tolist())
        return DataLoader(ds, batch_size=batch_size, collate_fn=skip_none_collate)

    def skipped_images(self) -> list[str]:
        """Unreadable images skipped during the run (none for in-memory data)."""
        return []

    def _sampler(self):
        kind = self.hparams.get("sampler")
        if kind in (None, "none"):
            return None
        if kind != "weighted":
            raise ValueError(f"datamodule.sampler={kind!r} must be null or 'weighted'")
        ds = self.datasets.get("train")
        targets = getattr(ds, "targets", None)  # what the dataset really holds (after skips)
        w = sample_weights(self.targets("train") if targets is None else targets,
                           self.num_classes)
        # draws follow the global torch seed (``seed_everything``), fresh every epoch
        return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(w),
                                     replacement=True)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        bs = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        ds = self.datasets[split]
        if split == "train" and self.train_index:
            ds = WithIndex(ds)
        sampler = self._sampler() if shuffle else None
        trainer = self.trainer
        if self.shard_eval and not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = ShardSampler(len(ds), trainer.global_rank, trainer.world_size)
        return DataLoader(
            ds, batch_size=bs, shuffle=shuffle and sampler is None, sampler=sampler,
            num_workers=hp.num_workers, pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0, drop_last=shuffle and len(ds) > bs,
            collate_fn=skip_none_collate, worker_init_fn=seed_worker if hp.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
