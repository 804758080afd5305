"""Decode a split once: into memory (``preload``) or into a memory-mapped cache file.

The cache (:func:`open_cache`): the first run decodes every image of a split once and writes
them to ``<cache_dir>/<dataset>-<split>-<size>px-<C>ch-<hash>.npy``; the hash covers the file list
(paths, sizes and modification times), so a changed dataset gets a new cache. Later runs and every dataloader worker
memory-map the file read-only. Writing goes to a temporary name and is renamed at the end, so a
killed run never leaves a half-written cache behind. Images that cannot be decoded stay zero
and are recorded in the cache's ``.json`` (rows, paths, reasons), so every later run knows them
without reading the files; the datamodule skips them, or stops with ``strict``.
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

from .decode import decode_image, unreadable_reason

__all__ = ["cache_name", "decode_to_memory", "open_cache"]

log = logging.getLogger("medrobust.data")


def cache_name(dataset: str, split: str, image_size: int, in_chans: int,
               paths: Sequence[str]) -> str:
    """Cache file name keyed by dataset, split, size, channels and a hash of the file list
    (paths, sizes and modification times: a file replaced in place gets a new cache)."""
    h = hashlib.sha1()
    for p in paths:
        h.update(os.path.abspath(p).encode())
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"?")
        h.update(b"\0")
    return f"{dataset}-{split}-{image_size}px-{in_chans}ch-{h.hexdigest()[:16]}.npy"


def _decode_all(paths: Sequence[str], image_size: int, in_chans: int, out: np.ndarray,
                workers: int) -> dict[int, str]:
    """Decode ``paths`` into ``out`` (threads: PIL releases the GIL); ``{row: reason}`` of the
    unreadable ones (their rows stay zero). The caller decides to skip or stop (``strict``)."""
    def one(i: int) -> tuple[int, str] | None:
        try:
            out[i] = decode_image(paths[i], image_size, in_chans)
            return None
        except OSError as err:
            return i, unreadable_reason(err, paths[i])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(r for r in pool.map(one, range(len(paths))) if r is not None)


def decode_to_memory(paths: Sequence[str], image_size: int, in_chans: int,
                     workers: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """All images decoded into one ``uint8 (N, S, S, C)`` array, and ``{row: reason}`` of the
    unreadable ones."""
    out = np.zeros((len(paths), image_size, image_size, in_chans), dtype=np.uint8)
    bad = _decode_all(paths, image_size, in_chans, out, workers or os.cpu_count() or 1)
    return out, bad


def open_cache(cache_dir: str | os.PathLike, name: str, paths: Sequence[str], image_size: int,
               in_chans: int, workers: int | None = None) -> tuple[str, dict[int, str]]:
    """Path of the ``.npy`` cache for ``paths`` (built now if absent) and ``{row: reason}`` of
    the rows it could not decode. The cache records those (rows, paths and reasons in its
    ``.json``), so a later run, ``strict`` or not, learns of them without reading the images."""
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    npy, meta = root / name, root / (name[:-4] + ".json")
    if npy.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("n") == len(paths):
            reasons = info.get("bad_reasons") or [""] * len(info["bad_rows"])
            return str(npy), {int(i): str(r) for i, r in zip(info["bad_rows"], reasons,
                                                                strict=True)}
    log.info("building image cache %s (%d images, %dpx)", npy, len(paths), image_size)
    tmp = root / f".{name[:-4]}.{os.getpid()}.tmp.npy"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), image_size, image_size, in_chans))
        bad = _decode_all(paths, image_size, in_chans, arr, workers or os.cpu_count() or 1)
        arr.flush()
        del arr
        os.replace(tmp, npy)
    finally:
        if tmp.exists():
            tmp.unlink()
    rows = sorted(bad)
    tmp_meta = root / f".{name[:-4]}.{os.getpid()}.tmp.json"
    tmp_meta.write_text(json.dumps({"n": len(paths), "bad_rows": rows,
                                "bad_paths": [paths[i] for i in rows],
                                "bad_reasons": [bad[i] for i in rows], "image_size": image_size,
                                "in_chans": in_chans, "first": paths[0] if paths else None}))
    os.replace(tmp_meta, meta)
    return str(npy), bad
