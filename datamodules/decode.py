"""Image files to arrays: every image goes through :func:`decode_image`.

Opened with PIL (JPEG at a reduced DCT scale when that is still larger than the target, which
makes full-size dermoscopy photos cheap), converted to grayscale (``in_chans=1``) or RGB
(``in_chans=3``), resized to a square ``image_size`` and returned as ``uint8`` ``(H, W, C)``.
Augmentation runs on that array; :class:`~datamodules.dataset.ImageDataset` then hands the model
``float32`` ``(C, H, W)`` in [0, 1] (normalisation lives inside the model).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

__all__ = ["decode_image", "native_channels", "check_in_chans", "READ_ERRORS", "check_image",
           "find_unreadable", "describe_unreadable", "unreadable_reason"]

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;gray"}
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
    except READ_ERRORS as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return arr[..., None] if arr.ndim == 2 else arr


def native_channels(path: str) -> int:
    """1 for a grayscale file, 3 otherwise (reads the header only)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except READ_ERRORS as err:
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


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _tail(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read(n)


def _looks_complete(im: Image.Image, path: str) -> bool:
    """Whether the file's structure is complete without decoding pixels: a JPEG ends with its
    end-of-image marker, a PNG with its ``IEND`` chunk, a TIFF's strips or tiles lie inside
    the file. Other formats, and files that fail these tests, are decoded to be sure."""
    if im.format == "JPEG":
        return _tail(path, 2) == b"\xff\xd9"
    if im.format == "PNG":
        return _tail(path, len(_PNG_END)) == _PNG_END
    if im.format == "TIFF":
        tags = im.tag_v2
        offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
        if not offsets or not counts:
            return False
        size = os.path.getsize(path)
        return all(int(o) + int(c) <= size for o, c in zip(offsets, counts, strict=False))
    return False


def check_image(path: str, image_size: int, in_chans: int) -> None:
    """Raise ``OSError`` naming ``path`` if the file cannot be decoded. Cheap for intact JPEG,
    PNG and TIFF files (header and end of file only, see :func:`_looks_complete`); anything
    else, and any file that looks cut short, is decoded as :func:`decode_image` decodes it, so
    a file passes exactly when loading it would work (bar damage inside compressed data)."""
    try:
        with Image.open(path) as im:
            if _looks_complete(im, path):
                return
    except READ_ERRORS as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    decode_image(path, image_size, in_chans)


def unreadable_reason(err: BaseException, path: str) -> str:
    """The decoder's message without the path it repeats."""
    return str(err).replace(f"cannot read image {path}: ", "").replace(f" '{path}'", "")


def find_unreadable(paths: Sequence[str], image_size: int, in_chans: int,
                    workers: int | None = None) -> dict[str, str]:
    """``{path: reason}`` for every file of ``paths`` that :func:`check_image` rejects."""
    def one(path: str) -> tuple[str, str] | None:
        try:
            check_image(path, image_size, in_chans)
        except OSError as err:
            return path, unreadable_reason(err, path)
        return None

    n = max(1, min(16, workers or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return dict(r for r in pool.map(one, paths) if r is not None)


def describe_unreadable(bad: dict[str, str], strict: bool, root: str | None = None,
                        show: int = 10) -> str:
    """One line naming unreadable files (relative to ``root``) and the first reason: the
    warning when they are skipped, or the error when ``strict`` stops the run."""
    def name(p: str) -> str:
        if root:
            rel = os.path.relpath(p, root)
            if not rel.startswith(".."):
                return rel
        return p

    names = [name(p) for p in sorted(bad)]
    listed = ", ".join(names[:show]) + (f", ... ({len(names) - show} more)"
                                        if len(names) > show else "")
    first = sorted(bad)[0]
    why = f" (first: {bad[first]})" if bad[first] else ""
    if strict:
        return (f"{len(bad)} unreadable image(s) and datamodule.strict=true: {listed}{why}; "
                "replace or remove them, or set datamodule.strict=false to skip them")
    return f"skipped {len(bad)} unreadable image(s) (strict=false): {listed}{why}"
