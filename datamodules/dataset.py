"""The dataset of decoded images, and what happens to files that cannot be read.

Unreadable files (corrupt or truncated): with ``strict=False`` each is skipped with a warning
that names it, the batch is simply one image shorter, and :class:`BadImageLog` keeps the list
(shared by dataloader worker processes through a small file) for a final count; with
``strict=True`` the first one stops the run with its path.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .decode import decode_image

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
            f.write(path + "\n")

    def paths(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return sorted({line.strip() for line in f if line.strip()})
        except FileNotFoundError:
            return []

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
                if self.strict or self.bad_log is None:
                    raise OSError(f"{err} (set datamodule.strict=false to skip unreadable "
                                  "images with a warning)") from err
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
