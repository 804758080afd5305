"""The dataset of decoded images, and what happens to files that cannot be read.

Unreadable files (corrupt or truncated): with ``strict=False`` each is skipped with a warning
that names it, the batch is simply one image shorter, and :class:`BadImageLog` keeps the list
(shared by dataloader worker processes through a small file) for a final count; with
``strict=True`` the first one stops the run with its path (:class:`ConfigError`, one line).
The datamodules check every file at start-up, so what is met here was damaged inside its pixel
data (and neither ``preload`` nor the cache decoded it first) or after start-up.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from lightning_modules.core.errors import ConfigError

from .decode import decode_image, unreadable_reason

__all__ = ["BadImageLog", "ImageDataset", "skip_none_collate"]

log = logging.getLogger("medrobust.data")


class BadImageLog:
    """Unreadable images met while loading; worker processes append to one shared file."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="medrobust-bad-images-", suffix=".txt")
        os.close(fd)
        self.owner = os.getpid()  # worker processes hold copies; only the creator cleans up

    def add(self, path: str, err: BaseException) -> None:
        log.warning("skipping unreadable image %s (%s)", path, err)
        with open(self.path, "a", encoding="utf-8") as f:
            why = " ".join(unreadable_reason(err, path).split())
            f.write(f"{path}\t{why}\n")

    def reasons(self) -> dict[str, str]:
        """``{path: reason}`` of every image recorded so far (by any process)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                rows = [line.rstrip("\n").partition("\t") for line in f if line.strip()]
        except FileNotFoundError:
            return {}
        return {p: why for p, _, why in rows}

    def paths(self) -> list[str]:
        return sorted(self.reasons())

    def __len__(self) -> int:
        """Nonzero once anything was recorded (one ``stat``; cheap enough per batch)."""
        try:
            return int(os.path.getsize(self.path) > 0)
        except OSError:
            return 0

    def __del__(self) -> None:  # pragma: no cover - best effort clean-up
        try:
            if os.getpid() == self.owner:
                os.unlink(self.path)
        except (OSError, AttributeError, TypeError):
            pass


class ImageDataset(Dataset):
    """Images (from files, an in-memory array or a cache file) with their targets.

    Args:
        paths: one file per sample (used for decoding and in error messages).
        targets: ``(N,)`` class indices or ``(N, K)`` multi-hot findings.
        image_size, in_chans: decoded size (pixels) and channels.
        transform: albumentations-style callable on ``image=uint8 (H, W, C)``.
        images: pre-decoded ``uint8 (N, H, W, C)`` array, or ``cache_file``: a ``.npy`` to
            memory-map (opened lazily in each worker process, never pickled).
        rows: row of each sample in ``images``/``cache_file`` (default ``0..N-1``).
        strict: raise on an unreadable file instead of skipping it (``bad_log`` records skips).
    """

    def __init__(self, paths: Sequence[str] | None, targets: np.ndarray, image_size: int,
                 in_chans: int, transform=None, images: np.ndarray | None = None,
                 cache_file: str | None = None, rows: np.ndarray | None = None,
                 strict: bool = False, bad_log: BadImageLog | None = None) -> None:
        self.paths = list(paths) if paths is not None else None
        self.targets = targets
        self.image_size, self.in_chans = image_size, in_chans
        self.transform = transform
        self.images, self.cache_file = images, cache_file
        self.rows = np.arange(len(targets)) if rows is None else np.asarray(rows)
        self.strict, self.bad_log = strict, bad_log
        if self.paths is None and images is None and cache_file is None:
            raise ValueError("ImageDataset needs paths, images or a cache file")

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.cache_file is not None:
            state["images"] = None  # each worker maps the file itself
        return state

    def _array(self) -> np.ndarray | None:
        if self.images is None and self.cache_file is not None:
            self.images = np.load(self.cache_file, mmap_mode="r")
        return self.images

    def __getitem__(self, i: int):
        images = self._array()
        if images is not None:
            img = np.asarray(images[self.rows[i]])
        else:
            path = self.paths[i]
            try:
                img = decode_image(path, self.image_size, self.in_chans)
            except OSError as err:
                # strict: one line (train.py, evaluate.py). In a worker process an exception
                # would reach the main process with the worker's traceback in its message, so
                # there the image is recorded and the datamodule raises in the main process
                # (ImageTableDataModule.on_before_batch_transfer).
                in_worker = get_worker_info() is not None
                if self.bad_log is None or (self.strict and not in_worker):
                    raise ConfigError(f"{err} (datamodule.strict=true; set it to false to skip "
                                      "unreadable images with a warning)") from None
                self.bad_log.add(path, err)
                return None
        if self.transform is not None:
            img = self.transform(image=img)["image"]
            if img.ndim == 2:
                img = img[..., None]
        img = np.ascontiguousarray(img)
        if not img.flags.writeable:  # decoded by PIL or memory-mapped read-only
            img = img.copy()
        x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
        t = self.targets[i]
        y = torch.as_tensor(t, dtype=torch.float32) if np.ndim(t) else int(t)
        return x, y


def skip_none_collate(batch: list):
    """``default_collate`` over the samples that could be read (unreadable ones are ``None``)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise OSError(f"all {len(batch)} images of a batch are unreadable (see the warnings)")
    return default_collate(kept)
