"""Image files to tensors: decoding, unreadable files, the memory-mapped cache, grouped splits.

Every image goes through :func:`decode_image`: opened with PIL (JPEG at a reduced DCT scale when
that is still larger than the target, which makes full-size dermoscopy photos cheap), converted
to grayscale (``in_chans=1``) or RGB (``in_chans=3``), resized to a square ``image_size`` and
returned as ``uint8`` ``(H, W, C)``. Augmentation runs on that array; :class:`ImageDataset` then
hands the model ``float32`` ``(C, H, W)`` in [0, 1] (normalisation lives inside the model).

Unreadable files (corrupt or truncated): with ``strict=False`` each is skipped with a warning
that names it, the batch is simply one image shorter, and :class:`BadImageLog` keeps the list
(shared by dataloader worker processes through a small file) for a final count; with
``strict=True`` the first one stops the run with its path.

The cache (:func:`open_cache`): the first run decodes every image of a split once and writes
them to ``<cache_dir>/<dataset>-<split>-<size>px-<C>ch-<hash>.npy``; the hash covers the file list
(paths and sizes), so a changed dataset gets a new cache. Later runs and every dataloader worker
memory-map the file read-only. Writing goes to a temporary name and is renamed at the end, so a
killed run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

__all__ = [
    "IMAGE_SUFFIXES", "BadImageLog", "ImageDataset", "decode_image", "native_channels",
    "check_in_chans", "open_cache", "cache_name", "skip_none_collate", "split_indices",
    "index_images", "missing_files_error",
]

log = logging.getLogger("medrobust.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;gray"}
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(path: str, image_size: int, in_chans: int) -> np.ndarray:
    """``uint8`` array ``(image_size, image_size, in_chans)`` from an image file.

    16-bit grayscale (some X-ray PNGs) is rescaled by its own maximum; palette and alpha images
    are converted. Raises ``OSError`` naming ``path`` when the file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            target = "L" if in_chans == 1 else "RGB"
            if im.format == "JPEG":
                im.draft(target, (image_size, image_size))  # DCT downscale, never below target
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.float32)
                peak = float(arr.max()) or 1.0
                im = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8))
            im = im.convert(target).resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except _READ_ERRORS as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return arr[..., None] if arr.ndim == 2 else arr


def native_channels(path: str) -> int:
    """1 for a grayscale file, 3 otherwise (reads the header only)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except _READ_ERRORS as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return 1 if mode in _GRAY_MODES else 3


def check_in_chans(paths: Sequence[str], in_chans: int | None, key: str = "datamodule.in_chans",
                   probe: int = 8) -> int:
    """The channel count of the data (first readable of ``probe`` files); raises if ``in_chans``
    is given and differs. Returns ``in_chans`` or, when it is ``None``, the detected count."""
    found = None
    for p in list(paths)[:probe]:
        try:
            found = native_channels(p)
            break
        except OSError:
            continue
    if found is None:
        raise OSError(f"none of the first {min(probe, len(paths))} images can be read, "
                      f"e.g. {list(paths)[:1]}")
    if in_chans is None:
        return found
    if int(in_chans) not in (1, 3):
        raise ValueError(f"{key}={in_chans} must be 1 (grayscale) or 3 (RGB)")
    if int(in_chans) != found:
        kind = "grayscale (1 channel)" if found == 1 else "colour (3 channels)"
        raise ValueError(f"{key}={in_chans} does not match the data: {paths[0]} is {kind}; "
                         f"set {key}={found}")
    return int(in_chans)


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


def cache_name(dataset: str, split: str, image_size: int, in_chans: int,
               paths: Sequence[str]) -> str:
    """Cache file name keyed by dataset, split, size, channels and a hash of the file list."""
    h = hashlib.sha1()
    for p in paths:
        h.update(os.path.abspath(p).encode())
        try:
            h.update(str(os.stat(p).st_size).encode())
        except OSError:
            h.update(b"?")
        h.update(b"\0")
    return f"{dataset}-{split}-{image_size}px-{in_chans}ch-{h.hexdigest()[:16]}.npy"


def _decode_all(paths: Sequence[str], image_size: int, in_chans: int, out: np.ndarray,
                strict: bool, workers: int) -> list[int]:
    """Decode ``paths`` into ``out`` (threads: PIL releases the GIL); returns unreadable rows."""
    def one(i: int) -> int | None:
        try:
            out[i] = decode_image(paths[i], image_size, in_chans)
            return None
        except OSError as err:
            if strict:
                raise OSError(f"{err} (set datamodule.strict=false to skip unreadable images "
                              "with a warning)") from err
            log.warning("skipping unreadable image %s (%s)", paths[i], err)
            return i

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [i for i in pool.map(one, range(len(paths))) if i is not None]


def decode_to_memory(paths: Sequence[str], image_size: int, in_chans: int, strict: bool,
                     workers: int | None = None) -> tuple[np.ndarray, list[int]]:
    """All images decoded into one ``uint8 (N, S, S, C)`` array, and the unreadable rows."""
    out = np.zeros((len(paths), image_size, image_size, in_chans), dtype=np.uint8)
    bad = _decode_all(paths, image_size, in_chans, out, strict, workers or os.cpu_count() or 1)
    return out, bad


def open_cache(cache_dir: str | os.PathLike, name: str, paths: Sequence[str], image_size: int,
               in_chans: int, strict: bool, workers: int | None = None) -> tuple[str, list[int]]:
    """Path of the ``.npy`` cache for ``paths`` (built now if absent) and its unreadable rows."""
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    npy, meta = root / name, root / (name[:-4] + ".json")
    if npy.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("n") == len(paths):
            return str(npy), [int(i) for i in info["bad_rows"]]
    log.info("building image cache %s (%d images, %dpx)", npy, len(paths), image_size)
    tmp = root / f".{name[:-4]}.{os.getpid()}.tmp.npy"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), image_size, image_size, in_chans))
        bad = _decode_all(paths, image_size, in_chans, arr, strict,
                          workers or os.cpu_count() or 1)
        arr.flush()
        del arr
        os.replace(tmp, npy)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta.write_text(json.dumps({"n": len(paths), "bad_rows": bad, "image_size": image_size,
                                "in_chans": in_chans, "first": paths[0] if paths else None}))
    return str(npy), bad


def index_images(root: str | os.PathLike) -> dict[str, str]:
    """``{file stem: path}`` for every image under ``root`` (first found wins)."""
    files: dict[str, str] = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_SUFFIXES:
                files.setdefault(stem, os.path.join(dirpath, name))
    return files


def missing_files_error(missing: Sequence[str], listed_in: str, where: str) -> FileNotFoundError:
    """One error for every image listed in ``listed_in`` but absent: the first few and the count."""
    return FileNotFoundError(
        f"{len(missing)} image(s) listed in {listed_in} are missing under {where}, "
        f"e.g. {list(missing)[:5]}"
    )


def _surrogate_labels(labels: np.ndarray) -> np.ndarray:
    """Class labels for stratification; multi-hot rows map to their rarest positive finding."""
    if labels.ndim == 1:
        return labels
    freq = labels.sum(axis=0)
    order = np.where(labels > 0, freq[None, :], np.inf)
    surrogate = order.argmin(axis=1)
    surrogate[~(labels > 0).any(axis=1)] = labels.shape[1]  # no finding
    return surrogate


def _one_fold(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1.0 / fraction))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise ValueError(f"cannot split {len(idx)} images in {n_groups} patient/lesion groups "
                         f"into folds of about {fraction:.2f}: need at least {n_splits} groups "
                         "(add data, or lower datamodule.val_fraction/test_fraction)")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only k members" on tiny data
        warnings.simplefilter("ignore", UserWarning)
        try:
            keep, held = next(sgkf.split(idx, _surrogate_labels(labels[idx]), groups[idx]))
        except ValueError as err:
            raise ValueError(f"cannot split {len(idx)} images into stratified folds of about "
                             f"{fraction:.2f} ({err}); add data or raise "
                             "datamodule.val_fraction/test_fraction") from err
    return idx[keep], idx[held]


def split_indices(labels: np.ndarray, groups: np.ndarray | None, val_fraction: float,
                  test_fraction: float | None, seed: int,
                  rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Stratified, group-disjoint train/val(/test) row indices (``StratifiedGroupKFold``).

    ``labels`` are class indices ``(N,)`` or multi-hot ``(N, K)`` (stratified on each row's
    rarest finding). ``groups`` (patient or lesion ids; ``None`` = every row its own group)
    never straddle two splits. Fractions are approximate (folds hold whole groups). Only
    ``rows`` (default all) are split; ``test_fraction=None`` gives train and val only.
    """
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if frac is not None and not 0.0 < frac < 1.0:
            raise ValueError(f"datamodule.{key}={frac} must be in (0, 1)")
    if test_fraction is not None and val_fraction + test_fraction >= 1.0:
        raise ValueError("datamodule.val_fraction + datamodule.test_fraction must be < 1")
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    rest = np.arange(len(labels)) if rows is None else np.asarray(rows)
    out: dict[str, np.ndarray] = {}
    if test_fraction is not None:
        rest, out["test"] = _one_fold(rest, labels, groups, test_fraction, seed)
        val_fraction = val_fraction / (1.0 - test_fraction)
    out["train"], out["val"] = _one_fold(rest, labels, groups, val_fraction, seed + 1)
    return {k: np.sort(v) for k, v in out.items()}
