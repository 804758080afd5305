"""Decode a split once: into memory (``preload``) or into a memory-mapped cache file.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .decode import decode_image

__all__ = ["cache_name", "decode_to_memory", "open_cache"]

log = logging.getLogger("medrobust.data")


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
