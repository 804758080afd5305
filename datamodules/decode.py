"""Image files to arrays: every image goes through :func:`decode_image`.

Opened with PIL (JPEG at a reduced DCT scale when that is still larger than the target, which
makes full-size dermoscopy photos cheap), converted to grayscale (``in_chans=1``) or RGB
(``in_chans=3``), resized to a square ``image_size`` and returned as ``uint8`` ``(H, W, C)``.
Augmentation runs on that array; :class:`~datamodules.dataset.ImageDataset` then hands the model
``float32`` ``(C, H, W)`` in [0, 1] (normalisation lives inside the model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["decode_image", "native_channels", "check_in_chans", "READ_ERRORS"]

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
