"""Common, non-adversarial image corruptions per imaging domain, at 5 severities.

The sets follow MedMNIST-C (Di Salvo et al., "MedMNIST-C: Comprehensive benchmark and improved
classifier robustness by simulating realistic image corruptions", arXiv:2406.17536, 2024),
which chose each domain's corruptions and their 5 severities for 224 px images:

- ``dermoscopy`` (its DermaMNIST set): pixelate, JPEG, Gaussian / speckle / impulse / shot
  noise, defocus / motion / zoom blur, brightness and contrast up and down, black corners (the
  dermatoscope's vignette) and characters (ruler marks and ink);
- ``xray`` (its ChestMNIST set): the four noises, Gaussian blur, pixelate, JPEG, brightness,
  contrast and gamma up and down; ``xray_pneumonia`` (its PneumoniaMNIST set): the same
  kinds, milder noise and pixelation;
- ``fundus`` (its RetinaMNIST set): pixelate, JPEG, Gaussian / speckle noise, defocus and
  motion blur, brightness and contrast down;
- ``pathology`` (PathMNIST) and ``blood`` (BloodMNIST): pixelate, JPEG, defocus and motion
  blur, brightness and contrast up and down, saturate, stain deposit and bubbles;
  ``tissue`` (TissueMNIST), ``oct`` (OCTMNIST), ``breast_ultrasound`` (BreastMNIST) and
  ``abdominal_ct`` (OrganAMNIST / OrganCMNIST / OrganSMNIST): their MedMNIST-C sets;
- ``general``, for other data: the ImageNet-C kinds that apply to medical images (Hendrycks &
  Dietterich, ICLR 2019; its definitions and severities; no weather, glass or elastic).

Corruptions act on ``uint8 (H, W, C)`` images (C = 1 or 3), as a scanner would write them, and
return the same shape and dtype; a grey image is corrupted as RGB and converted back with
PIL's luminance weights, as MedMNIST-C builds its grey sets. Spatial parameters (blur radii,
text size, stains, bubbles) are scaled by ``min(H, W) / 224``, so a severity means the same
on a 64 px image as on the 224 px ones the parameters were chosen for (a blur well below a
pixel then changes the image little or not at all: the benchmark reports such cells).
The definitions are the references' (medmnistc 0.1.0; ImageNet-C's ``make_imagenet_c.py``):
PIL for JPEG, brightness and contrast (MedMNIST-C), torchvision's gamma table, skimage's
salt-and-pepper (each channel independently), ImageNet-C's zoom blur (clipped zooms) and
HSV brightness and per-channel contrast (``general``), ImageMagick's motion-blur kernel
(reaching twice its radius); values are truncated to uint8 where the references truncate.
Two deviations: defocus and motion blur and Gaussian blur take fractional radii and sigmas
(the references' whole-pixel kernels are too coarse once scaled to 64 px), and pixelate
works at the 224 px reference (see :func:`pixelate`). Two fixes to the published tables:
DermaMNIST's black-corner radii are listed 1.10, 1.05, 1.00, 0.90, 0.95 (the last two
swapped; here in decreasing order), and a 6th severity given for some entries is dropped.
Every corruption is deterministic for a seed (:func:`image_rng`).

:class:`CorruptionAugment` offers a set as a training augmentation (as MedMNIST-C does): with
probability ``p``, one random corruption of the set at a random severity.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CORRUPTION_SETS", "SEQUENCE_KINDS", "CorruptionAugment", "corrupt", "image_rng",
           "sequence_frames", "set_for_datamodule", "to_uint8", "from_uint8"]

REFERENCE_SIDE = 224  # the image side MedMNIST-C and ImageNet-C chose their parameters for


# ---------------------------------------------------------------------------- the corruptions
def _albu(transform, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    transform.set_random_seed(int(rng.integers(2**31)))
    return transform(image=img)["image"]


def _float(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _uint8_trunc(x: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats to uint8 truncated, as the references write them
    (``(np.clip(x, 0, 1) * 255).astype(np.uint8)``)."""
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _ref_side(img: np.ndarray, scale: float) -> tuple[int, int]:
    """``(height, width)`` of ``img`` brought to the 224 px reference."""
    h, w = img.shape[:2]
    return max(int(round(h / scale)), 1), max(int(round(w / scale)), 1)


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def pixelate(img, c: float, rng, scale: float):
    """Loss of resolution, at the 224 px reference: the image brought to 224 px by pixel
    replication (nearest: no blur of its own), there down to ``c`` of the side (area) and
    back up (bilinear), and only the change this made brought back to the image's size (area)
    and added, so a ratio near 1 changes nothing.

    Pixelation is relative to the side it is done at, so its strength depends on the scale it
    is compared at; this follows the 224 px reference because MedMNIST-C chose its severities
    for 224 px images, and pixelating a 64 px image directly is not monotone in severity (a
    ratio of 0.5 aligns the pixel grid and changes the image less than 0.6 does; with PIL's
    box filter up, as MedMNIST-C, neither is the replicated 224 px copy). On 64 px images this
    is monotone and 1-5 dB stronger than MedMNIST-C's 224 px output brought to 64 px (the
    replicated copy has sharper edges than the unseen 224 px image)."""
    import cv2

    h, w = img.shape[:2]
    big_h, big_w = _ref_side(img, scale)
    big = cv2.resize(img, (big_w, big_h), interpolation=cv2.INTER_NEAREST).astype(np.float32)
    small = cv2.resize(big, (max(int(big_w * c), 1), max(int(big_h * c), 1)),
                       interpolation=cv2.INTER_AREA)
    change = cv2.resize(small, (big_w, big_h), interpolation=cv2.INTER_LINEAR) - big
    change = cv2.resize(change, (w, h), interpolation=cv2.INTER_AREA).reshape(img.shape)
    return np.clip(np.rint(img + change), 0, 255).astype(np.uint8)


def jpeg_compression(img, quality: int, rng, scale: float):
    """A JPEG round trip at ``quality`` through PIL (as MedMNIST-C and ImageNet-C): RGB stays
    RGB (OpenCV's encoder would read it as BGR and shift the colours)."""
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    _pil(img).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buf)).reshape(img.shape)


def gaussian_noise(img, std: float, rng, scale: float):
    """Additive Gaussian noise, ``std`` in [0, 1] intensity units, per pixel and channel."""
    x = _float(img)
    return _uint8_trunc(x + rng.normal(0.0, std, size=x.shape))


def speckle_noise(img, std: float, rng, scale: float):
    """Multiplicative noise: ``x + x * N(0, std)``."""
    x = _float(img)
    return _uint8_trunc(x + x * rng.normal(0.0, std, size=x.shape))


def impulse_noise(img, amount: float, rng, scale: float):
    """Salt-and-pepper noise as ``skimage.util.random_noise(x, "s&p", amount)`` (MedMNIST-C
    and ImageNet-C): each value (pixel and channel independently) is replaced with
    probability ``amount``, by white or black with probability 1/2 each."""
    flipped = rng.random(img.shape) <= amount
    salted = rng.random(img.shape) <= 0.5
    out = img.copy()
    out[flipped & salted] = 255
    out[flipped & ~salted] = 0
    return out


def shot_noise(img, photons: float, rng, scale: float):
    """Poisson noise: ``Poisson(x * photons) / photons`` (fewer photons, more noise)."""
    return _uint8_trunc(rng.poisson(_float(img) * photons) / photons)


def _filter(img: np.ndarray, kernel: np.ndarray, trunc: bool = False) -> np.ndarray:
    import cv2

    out = cv2.filter2D(_float(img), -1, kernel.astype(np.float32),
                       borderType=cv2.BORDER_REFLECT_101)
    return (_uint8_trunc if trunc else _uint8)(out.reshape(img.shape))


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """An anti-aliased disk of a fractional ``radius`` (8x supersampled), then a Gaussian of
    ``alias_blur``, normalised to sum 1."""
    import cv2

    half = int(np.ceil(radius)) + 1
    sub = (np.arange(-half * 8, half * 8 + 8) + 0.5) / 8.0 - 0.5
    xx, yy = np.meshgrid(sub, sub)
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    side = 2 * half + 1
    kernel = inside.reshape(side, 8, side, 8).mean(axis=(1, 3))
    if alias_blur > 0:
        kernel = cv2.GaussianBlur(kernel, (0, 0), sigmaX=alias_blur)
    return kernel / kernel.sum()


def defocus_blur(img, radius_alias: Sequence[float], rng, scale: float):
    """Convolution with a disk (defocus), radius and alias blur in 224 px units."""
    radius, alias = radius_alias
    return _filter(img, _disk(max(radius * scale, 0.5), alias * scale), trunc=True)


def motion_kernel(radius: float, sigma: float, angle: float, step: float = 1.0) -> np.ndarray:
    """ImageMagick's motion-blur kernel (``MotionBlurImage``, which MedMNIST-C and ImageNet-C
    call through Wand): a one-sided line of taps ``step`` px apart (its taps are one pixel
    apart at 224 px, ``step = scale`` here) from the pixel out to ``2 * radius`` (its kernel
    has ``2 * ceil(radius) + 1`` taps, so it reaches twice the radius), weights ``exp(-t^2 /
    (2 sigma^2))`` at distance ``t``, at ``angle`` radians; a tap off the pixel grid is split
    bilinearly (ImageMagick rounds it to the nearest pixel); normalised to sum 1."""
    extent = 2.0 * radius
    half = int(np.ceil(extent)) + 1
    kernel = np.zeros((2 * half + 1, 2 * half + 1), np.float64)
    for t in np.arange(0, int(np.floor(extent / step + 1e-9)) + 1) * step:
        px, py = half + t * np.cos(angle), half + t * np.sin(angle)
        x0, y0 = int(np.floor(px + 1e-9)), int(np.floor(py + 1e-9))
        fx, fy, w = max(px - x0, 0.0), max(py - y0, 0.0), np.exp(-t * t / (2 * sigma * sigma))
        kernel[y0, x0] += w * (1 - fx) * (1 - fy)
        kernel[y0, x0 + 1] += w * fx * (1 - fy)
        kernel[y0 + 1, x0] += w * (1 - fx) * fy
        kernel[y0 + 1, x0 + 1] += w * fx * fy
    return kernel / kernel.sum()


def motion_blur(img, radius_sigma: Sequence[float], rng, scale: float):
    """ImageMagick's motion blur (:func:`motion_kernel`), radius and sigma in 224 px units, at
    a random angle in [-45, 45] degrees."""
    radius, sigma = radius_sigma[0] * scale, max(radius_sigma[1] * scale, 0.25)
    angle = np.deg2rad(rng.uniform(-45, 45))
    return _filter(img, motion_kernel(radius, sigma, angle, min(scale, 1.0)))


def _zoom_linear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``scipy.ndimage.zoom(x, order=1)`` to ``(out_h, out_w)``: linear interpolation with the
    corner pixels aligned (output ``i`` samples input ``i * (n_in - 1) / (n_out - 1)``)."""
    def axis(n_in: int, n_out: int):
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    lo, hi, f = axis(x.shape[0], out_h)
    x = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
    lo, hi, f = axis(x.shape[1], out_w)
    return x[:, lo] * (1 - f)[None, :, None] + x[:, hi] * f[None, :, None]


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """ImageNet-C's and MedMNIST-C's ``clipped_zoom``: the centre ``ceil(side / factor)``
    crop (from ``(side - crop) // 2``), zoomed by ``factor`` (corner-aligned linear,
    ``round(crop * factor)`` pixels) and trimmed back to the side from ``(zoomed - side) //
    2``."""
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    z = _zoom_linear(x[top:top + ch, left:left + cw], int(round(ch * factor)),
                     int(round(cw * factor)))
    th, tw = (z.shape[0] - h) // 2, (z.shape[1] - w) // 2
    return z[th:th + h, tw:tw + w]


def zoom_blur(img, max_step: Sequence[float], rng, scale: float):
    """ImageNet-C's zoom blur (MedMNIST-C's too): the mean of the image and its
    :func:`clipped_zoom` by every factor of ``np.arange(1, max, step)`` (1 included, so the
    image counts twice). Scale-free: the factors are relative to the side."""
    top, step = max_step
    x = _float(img)
    factors = np.arange(1.0, top, step)
    out = np.zeros_like(x)
    for f in factors:
        out += clipped_zoom(x, float(f))
    return _uint8_trunc((x + out) / (len(factors) + 1))


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """A Gaussian of a fractional ``sigma`` (px) on the pixel grid: tap ``i`` is the continuous
    Gaussian's mass over ``[i - 1/2, i + 1/2]``, ``i`` within ``max(ceil(3 sigma), 1)``,
    normalised to sum 1; so a sigma well below a pixel still blurs a little."""
    from math import erf, sqrt

    r = max(int(np.ceil(3 * sigma)), 1)
    edges = np.arange(-r, r + 2) - 0.5
    cdf = np.array([0.5 * (1 + erf(e / (sqrt(2) * sigma))) for e in edges])
    taps = np.diff(cdf)
    return taps / taps.sum()


def _gaussian(img, sigma: float, rng=None):
    import cv2

    k = gaussian_kernel_1d(max(sigma, 1e-3)).astype(np.float32)
    out = cv2.sepFilter2D(_float(img), -1, k, k, borderType=cv2.BORDER_REFLECT_101)
    return _uint8(out.reshape(img.shape))


def torchvision_sigma(kernel: int) -> float:
    """The std of the kernel ``torchvision``'s ``gaussian_blur(kernel_size=kernel)`` uses (its
    default sigma ``0.3 * ((kernel - 1) / 2 - 1) + 0.8``, sampled at the whole-pixel taps
    within ``kernel // 2`` and normalised: the truncation narrows it)."""
    s = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    t = np.arange(-(kernel // 2), kernel // 2 + 1)
    w = np.exp(-t * t / (2 * s * s))
    return float(np.sqrt((w * t * t).sum() / w.sum()))


def gaussian_blur(img, kernel: int, rng, scale: float):
    """MedMNIST-C's Gaussian blur (torchvision's, a ``kernel``-pixel kernel at 224 px): a
    Gaussian (:func:`gaussian_kernel_1d`) of the std of that kernel, scaled to the image."""
    return _gaussian(img, torchvision_sigma(int(kernel)) * scale)


def brightness(img, factor: float, rng, scale: float):
    """PIL's ``ImageEnhance.Brightness`` (MedMNIST-C): every value times ``factor``,
    truncated."""
    from PIL import ImageEnhance

    return np.asarray(ImageEnhance.Brightness(_pil(img)).enhance(factor)).reshape(img.shape)


def contrast(img, factor: float, rng, scale: float):
    """PIL's ``ImageEnhance.Contrast`` (MedMNIST-C): a blend by ``factor`` with the mean of the
    image's luminance (rounded to an integer), truncated."""
    from PIL import ImageEnhance

    return np.asarray(ImageEnhance.Contrast(_pil(img)).enhance(factor)).reshape(img.shape)


def brightness_hsv(img, c: float, rng, scale: float):
    """ImageNet-C's brightness: ``c`` added to the HSV value (clipped to 1), hue and saturation
    kept: ``rgb * V' / V`` (black becomes grey ``V'``)."""
    x = _float(img).astype(np.float64)
    v = x.max(axis=-1, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    out = np.where(v > 0, x * v_new / np.where(v > 0, v, 1.0), v_new)
    return _uint8_trunc(out)


def contrast_channel(img, c: float, rng, scale: float):
    """ImageNet-C's contrast: each channel pulled to its own mean, ``(x - mean) * c + mean``."""
    x = _float(img).astype(np.float64)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _uint8_trunc((x - means) * c + means)


def saturate(img, c: float, rng, scale: float):
    """MedMNIST-C's saturate: ``c`` added to the HSV saturation (clipped to 1), hue and value
    kept (skimage's ``rgb2hsv`` / ``hsv2rgb``; a grey pixel has hue 0, red)."""
    x = _float(img).astype(np.float64)
    v = x.max(axis=-1, keepdims=True)
    delta = v - x.min(axis=-1, keepdims=True)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1.0), 0.0)
    s_new = np.minimum(s + c, 1.0)
    coloured = v - (v - x) * s_new / np.where(delta > 0, s, 1.0)
    red = np.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=-1)
    return _uint8_trunc(np.where(delta > 0, coloured, red))


def gamma(img, g: float, rng, scale: float):
    """torchvision's ``adjust_gamma`` on a PIL image (MedMNIST-C): the table
    ``int((256 - 1e-3) * (v / 255) ** g)`` (above 1 darkens, below 1 brightens)."""
    table = np.array([int((255 + 1 - 1e-3) * (v / 255.0) ** g) for v in range(256)], np.uint8)
    return table[img]


def black_corner(img, radius: float, rng, scale: float):
    """Black outside a centred circle of ``radius`` times the half side (a dermatoscope's
    vignette); smaller radii black out more."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = radius * min(h, w) / 2.0
    out = img.copy()
    out[(yy - (h - 1) / 2.0) ** 2 + (xx - (w - 1) / 2.0) ** 2 > r * r] = 0
    return out


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``img`` under ``colour`` with opacity ``alpha`` (drawn at the reference side, area
    resized to the image's)."""
    import cv2

    h, w = img.shape[:2]
    a = cv2.resize(alpha.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)[..., None]
    return _uint8(_float(img) * (1 - a) + colour * a)


def characters(img, words_letters_size: Sequence[float], rng, scale: float):
    """MedMNIST-C's characters: 1 to ``words`` random lower-case words of 3 to ``letters``
    letters, each in a random RGB colour, OpenCV's ``FONT_HERSHEY_DUPLEX`` (thickness 1,
    anti-aliased) at a font scale of 0.14 to ``size``, at a random origin (x in 10..side - 8 *
    letters, y in 10..side - 10). Drawn at 224 px and resized, so the text covers the same
    share of the image at any size (ruler marks and ink on the skin)."""
    import cv2

    words, letters, size = int(words_letters_size[0]), int(words_letters_size[1]), \
        float(words_letters_size[2])
    big_h, big_w = _ref_side(img, scale)
    out = img
    for _ in range(int(rng.integers(1, words + 1))):
        n = int(rng.integers(3, max(letters, 3) + 1))
        text = "".join(chr(ord("a") + int(i)) for i in rng.integers(0, 26, n))
        font = rng.integers(14, int(size * 100) + 1) / 100.0
        org = (int(rng.integers(10, max(big_w - 8 * n, 10) + 1)),
               int(rng.integers(10, max(big_h - 10, 10) + 1)))
        mask = np.zeros((big_h, big_w), np.uint8)
        cv2.putText(mask, text, org, cv2.FONT_HERSHEY_DUPLEX, font, 255, 1, cv2.LINE_AA)
        colour = rng.integers(0, 256, 3).astype(np.float32) / 255.0
        out = _blend(out, mask / 255.0, colour[: img.shape[-1]])
    return out


def stain_deposit(img, marks_side: Sequence[int], rng, scale: float):
    """MedMNIST-C's stain deposit (histology): 1 to ``max_marks`` black ink stains, each one of
    its 10 binary ink masks of ``side`` px at 224 px (:mod:`.inks`), at a random place at
    least 10 px from the border."""
    from lightning_modules.evaluation.corruptions.inks import inks

    max_marks, side = int(marks_side[0]), int(marks_side[1])
    masks = inks(side)
    big_h, big_w = _ref_side(img, scale)
    alpha = np.zeros((big_h, big_w), np.float32)
    for _ in range(int(rng.integers(1, max_marks + 1)) if max_marks > 1 else max_marks):
        ink = masks[int(rng.integers(len(masks)))]
        x = int(rng.integers(10, max(big_w - side - 10, 10) + 1))
        y = int(rng.integers(10, max(big_h - side - 10, 10) + 1))
        patch = alpha[y:y + side, x:x + side]
        np.maximum(patch, ink[:patch.shape[0], :patch.shape[1]], out=patch)
    return _blend(img, alpha, np.zeros(img.shape[-1], np.float32))


def bubble(img, radius_count: Sequence[int], rng, scale: float):
    """MedMNIST-C's bubbles (histology): 7 to ``count`` translucent white discs of radius 3 to
    ``radius`` px at 224 px (opacity 100/255, a 2 px rim of 130/255), drawn at 224 px."""
    from PIL import Image, ImageDraw

    max_radius, max_bubbles = int(radius_count[0]), int(radius_count[1])
    big_h, big_w = _ref_side(img, scale)
    layer = Image.new("L", (big_w, big_h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(7, max_bubbles + 1))):
        r = int(rng.integers(3, max_radius + 1))
        x = int(rng.integers(r, max(big_w - r, r) + 1))
        y = int(rng.integers(r, max(big_h - r, r) + 1))
        draw.ellipse((x - r - 2, y - r - 2, x + r + 2, y + r + 2), fill=130)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=100)
    return _blend(img, np.asarray(layer) / 255.0, np.ones(img.shape[-1], np.float32))


KINDS: dict[str, Callable[..., np.ndarray]] = {f.__name__: f for f in (
    pixelate, jpeg_compression, gaussian_noise, speckle_noise, impulse_noise, shot_noise,
    defocus_blur, motion_blur, zoom_blur, gaussian_blur, brightness, contrast, brightness_hsv,
    contrast_channel, saturate, gamma, black_corner, characters, stain_deposit, bubble)}


def _grey(rgb: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")``: ``(299 R + 587 G + 114 B) / 1000``, rounded (fixed point)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


@dataclass(frozen=True)
class Corruption:
    """One corruption: a kind from :data:`KINDS` and its parameter at severities 1..5.

    A grey ``(H, W, 1)`` image is corrupted as MedMNIST-C builds its grey sets: as RGB (the
    grey value in all three channels), then converted back with PIL's luminance weights, so
    independent noise in the three channels averages out as it does there."""

    kind: str
    severities: tuple

    def __call__(self, img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        if not 1 <= severity <= len(self.severities):
            raise ValueError(f"severity {severity} is not in 1..{len(self.severities)}")
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"corruptions take uint8 (H, W, C) images, got {img.dtype} "
                             f"{img.shape}")
        scale = min(img.shape[:2]) / REFERENCE_SIDE
        grey = img.shape[-1] == 1
        src = np.repeat(img, 3, axis=-1) if grey else img
        out = KINDS[self.kind](src, self.severities[severity - 1], rng, scale)
        out = _grey(out.reshape(src.shape)) if grey else out
        return np.ascontiguousarray(out.reshape(img.shape))


def _c(kind: str, *severities) -> Corruption:
    return Corruption(kind, tuple(severities))


_ZOOM = ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))
_NOISES = {
    "gaussian_noise": _c("gaussian_noise", 0.04, 0.08, 0.12, 0.18, 0.26),
    "speckle_noise": _c("speckle_noise", 0.05, 0.15, 0.2, 0.35, 0.45),
    "impulse_noise": _c("impulse_noise", 0.01, 0.03, 0.06, 0.09, 0.17),
    "shot_noise": _c("shot_noise", 60, 25, 18, 10, 5),
}
_UP_DOWN = {
    "brightness_up": _c("brightness", 1.1, 1.2, 1.3, 1.4, 1.5),
    "brightness_down": _c("brightness", 0.9, 0.8, 0.7, 0.6, 0.5),
    "contrast_up": _c("contrast", 1.1, 1.2, 1.3, 1.4, 1.6),
}
_GAMMA = {"gamma_up": _c("gamma", 1.1, 1.2, 1.3, 1.4, 1.6),
          "gamma_down": _c("gamma", 0.9, 0.8, 0.7, 0.6, 0.4)}
# stain deposit: (max marks, ink size at 224 px); MedMNIST-C takes the 24 px inks at
# severities 1-4 and the 32 px ones at severity 5
_INK = (24, 24, 24, 24, 32)
_ABDOMINAL_CT = {
    "pixelate": _c("pixelate", 0.7, 0.6, 0.5, 0.40, 0.35),
    "jpeg_compression": _c("jpeg_compression", 50, 30, 15, 10, 7),
    "gaussian_noise": _c("gaussian_noise", 0.04, 0.08, 0.12, 0.16, 0.20),
    "speckle_noise": _c("speckle_noise", 0.05, 0.10, 0.20, 0.30, 0.40),
    "impulse_noise": _c("impulse_noise", 0.01, 0.02, 0.03, 0.05, 0.08),
    "shot_noise": _c("shot_noise", 200, 100, 50, 25, 15),
    "gaussian_blur": _c("gaussian_blur", 11, 13, 15, 17, 21),
    "brightness_up": _c("brightness", 1.2, 1.3, 1.4, 1.5, 1.6),
    "brightness_down": _c("brightness", 0.8, 0.75, 0.7, 0.65, 0.60),
    "contrast_up": _c("contrast", 1.3, 1.4, 1.6, 1.7, 1.8),
    "contrast_down": _c("contrast", 0.8, 0.7, 0.6, 0.55, 0.5),
    "gamma_up": _c("gamma", 1.3, 1.4, 1.6, 1.8, 2.0),
    "gamma_down": _c("gamma", 0.9, 0.8, 0.7, 0.6, 0.4),
}

#: name -> {corruption name -> Corruption}; parameters as MedMNIST-C / ImageNet-C give them
CORRUPTION_SETS: dict[str, dict[str, Corruption]] = {
    "dermoscopy": {  # DermaMNIST
        "pixelate": _c("pixelate", 0.7, 0.5, 0.4, 0.3, 0.25),
        "jpeg_compression": _c("jpeg_compression", 30, 20, 15, 10, 7),
        **_NOISES,
        "defocus_blur": _c("defocus_blur", (4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
        "motion_blur": _c("motion_blur", (10, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": _c("zoom_blur", *_ZOOM),
        **_UP_DOWN,
        "contrast_down": _c("contrast", 0.8, 0.7, 0.6, 0.5, 0.4),
        "black_corner": _c("black_corner", 1.10, 1.05, 1.00, 0.95, 0.90),
        "characters": _c("characters", (1, 6, 0.14), (2, 7, 0.15), (3, 8, 0.16),
                         (4, 9, 0.17), (6, 10, 0.18)),
    },
    "xray": {  # ChestMNIST
        "pixelate": _c("pixelate", 0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": _c("jpeg_compression", 50, 30, 15, 10, 7),
        **_NOISES,
        "gaussian_blur": _c("gaussian_blur", 3, 5, 7, 9, 11),
        **_UP_DOWN,
        "contrast_down": _c("contrast", 0.9, 0.8, 0.7, 0.6, 0.4),
        **_GAMMA,
    },
    "xray_pneumonia": {  # PneumoniaMNIST: milder noise and pixelation than ChestMNIST
        "pixelate": _c("pixelate", 0.8, 0.7, 0.6, 0.5, 0.40),
        "jpeg_compression": _c("jpeg_compression", 50, 30, 15, 10, 7),
        "gaussian_noise": _c("gaussian_noise", 0.04, 0.05, 0.06, 0.07, 0.08),
        "speckle_noise": _c("speckle_noise", 0.05, 0.07, 0.10, 0.15, 0.20),
        "impulse_noise": _c("impulse_noise", 0.005, 0.01, 0.013, 0.017, 0.02),
        "shot_noise": _c("shot_noise", 300, 200, 150, 100, 80),
        "gaussian_blur": _c("gaussian_blur", 3, 5, 7, 9, 11),
        **_UP_DOWN,
        "contrast_down": _c("contrast", 0.9, 0.8, 0.7, 0.6, 0.4),
        **_GAMMA,
    },
    "fundus": {  # RetinaMNIST
        "pixelate": _c("pixelate", 0.8, 0.6, 0.5, 0.4, 0.35),
        "jpeg_compression": _c("jpeg_compression", 30, 25, 20, 10, 5),
        "gaussian_noise": _c("gaussian_noise", 0.04, 0.08, 0.12, 0.16, 0.20),
        "speckle_noise": _c("speckle_noise", 0.10, 0.15, 0.20, 0.25, 0.30),
        "defocus_blur": _c("defocus_blur", (4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
        "motion_blur": _c("motion_blur", (8, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
        "brightness_down": _c("brightness", 0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_down": _c("contrast", 0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "pathology": {  # PathMNIST (colon histology)
        "pixelate": _c("pixelate", 0.8, 0.6, 0.40, 0.30, 0.25),
        "jpeg_compression": _c("jpeg_compression", 50, 30, 15, 10, 7),
        "defocus_blur": _c("defocus_blur", (3, 0.1), (4, 0.1), (5, 0.2), (6, 0.2), (7, 0.3)),
        "motion_blur": _c("motion_blur", (5, 5), (10, 5), (15, 5), (15, 8), (15, 12)),
        "brightness_up": _c("brightness", 1.1, 1.15, 1.2, 1.22, 1.25),
        "brightness_down": _c("brightness", 0.85, 0.80, 0.75, 0.72, 0.70),
        "contrast_up": _c("contrast", 1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": _c("contrast", 0.8, 0.7, 0.6, 0.55, 0.5),
        "saturate": _c("saturate", 0.05, 0.10, 0.15, 0.20, 0.25),
        "stain_deposit": _c("stain_deposit", *zip((1, 2, 3, 4, 5), _INK, strict=True)),
        "bubble": _c("bubble", (7, 15), (10, 15), (12, 15), (15, 20), (17, 25)),
    },
    "blood": {  # BloodMNIST (blood-cell microscopy)
        "pixelate": _c("pixelate", 0.6, 0.5, 0.40, 0.30, 0.25),
        "jpeg_compression": _c("jpeg_compression", 50, 30, 15, 10, 7),
        "defocus_blur": _c("defocus_blur", (2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1)),
        "motion_blur": _c("motion_blur", (3, 3), (5, 5), (10, 5), (10, 7), (10, 9)),
        "brightness_up": _c("brightness", 1.1, 1.2, 1.3, 1.35, 1.4),
        "brightness_down": _c("brightness", 0.9, 0.8, 0.7, 0.6, 0.5),
        "contrast_up": _c("contrast", 1.1, 1.15, 1.2, 1.25, 1.3),
        "contrast_down": _c("contrast", 0.9, 0.8, 0.7, 0.6, 0.5),
        "saturate": _c("saturate", 0.05, 0.10, 0.15, 0.17, 0.20),
        "stain_deposit": _c("stain_deposit", *zip((1, 2, 3, 3, 3), _INK, strict=True)),
        "bubble": _c("bubble", (5, 10), (7, 10), (10, 10), (12, 12), (15, 12)),
    },
    "tissue": {  # TissueMNIST (kidney cortex microscopy, grey)
        "pixelate": _c("pixelate", 0.40, 0.30, 0.20, 0.15, 0.10),
        "jpeg_compression": _c("jpeg_compression", 25, 20, 15, 10, 7),
        "impulse_noise": _c("impulse_noise", 0.01, 0.015, 0.02, 0.025, 0.03),
        "gaussian_blur": _c("gaussian_blur", 13, 15, 17, 21, 25),
        "brightness_up": _c("brightness", 1.3, 1.4, 1.5, 1.6, 1.7),
        "brightness_down": _c("brightness", 0.8, 0.7, 0.6, 0.5, 0.4),
        "contrast_up": _c("contrast", 1.1, 1.2, 1.3, 1.4, 1.6),
        "contrast_down": _c("contrast", 0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "oct": {  # OCTMNIST (retinal OCT)
        "pixelate": _c("pixelate", 0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": _c("jpeg_compression", 30, 15, 10, 7, 5),
        "speckle_noise": _c("speckle_noise", 0.15, 0.30, 0.40, 0.50, 0.60),
        "defocus_blur": _c("defocus_blur", (0.5, 0.6), (1, 0.5), (1.5, 0.1), (2.0, 0.5),
                           (2.5, 0.1)),
        "motion_blur": _c("motion_blur", (10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "contrast_down": _c("contrast", 0.6, 0.4, 0.3, 0.2, 0.15),
    },
    "breast_ultrasound": {  # BreastMNIST
        "pixelate": _c("pixelate", 0.30, 0.25, 0.20, 0.15, 0.10),
        "jpeg_compression": _c("jpeg_compression", 50, 30, 15, 10, 7),
        "speckle_noise": _c("speckle_noise", 0.10, 0.15, 0.20, 0.25, 0.30),
        "motion_blur": _c("motion_blur", (5, 5), (9, 7), (9, 10), (13, 10), (17, 12)),
        "brightness_up": _c("brightness", 1.4, 1.5, 1.6, 1.8, 2.0),
        "brightness_down": _c("brightness", 0.55, 0.5, 0.45, 0.4, 0.3),
        "contrast_down": _c("contrast", 0.9, 0.8, 0.7, 0.6, 0.4),
    },
    "abdominal_ct": _ABDOMINAL_CT,  # OrganAMNIST, OrganCMNIST, OrganSMNIST (one set)
    "general": {  # ImageNet-C
        "gaussian_noise": _c("gaussian_noise", 0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": _c("shot_noise", 60, 25, 12, 5, 3),
        "impulse_noise": _c("impulse_noise", 0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": _c("speckle_noise", 0.15, 0.2, 0.35, 0.45, 0.6),
        "defocus_blur": _c("defocus_blur", (3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "motion_blur": _c("motion_blur", (10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": _c("zoom_blur", *_ZOOM),
        "brightness": _c("brightness_hsv", 0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": _c("contrast_channel", 0.4, 0.3, 0.2, 0.1, 0.05),
        "pixelate": _c("pixelate", 0.6, 0.5, 0.4, 0.3, 0.25),
        "jpeg_compression": _c("jpeg_compression", 25, 18, 15, 10, 7),
    },
}

# datamodule class -> set; a MedMNIST flag or the augmentation preset decides otherwise
_BY_DATAMODULE = {"HAM10000DataModule": "dermoscopy", "ISIC2016DataModule": "dermoscopy",
                  "ISIC2018DataModule": "dermoscopy", "ISIC2019DataModule": "dermoscopy",
                  "SyntheticDataModule": "dermoscopy", "ChestXray14DataModule": "xray",
                  "MessidorDataModule": "fundus"}
_BY_MEDMNIST = {"dermamnist": "dermoscopy", "chestmnist": "xray",
                "pneumoniamnist": "xray_pneumonia", "retinamnist": "fundus",
                "pathmnist": "pathology", "bloodmnist": "blood", "tissuemnist": "tissue",
                "octmnist": "oct", "breastmnist": "breast_ultrasound",
                "organamnist": "abdominal_ct", "organcmnist": "abdominal_ct",
                "organsmnist": "abdominal_ct"}


def _class_names(datamodule_cfg: Any) -> list[str]:
    """The classes a folder datamodule names (``classes``) or finds (``data_dir/<class>`` or
    ``data_dir/<split>/<class>``); none if the folder is not there."""
    from pathlib import Path

    named = datamodule_cfg.get("classes")
    if named:
        return [str(c) for c in named]
    data_dir = datamodule_cfg.get("data_dir")
    try:
        root = Path(str(data_dir)).expanduser()
        if not data_dir or not root.is_dir():
            return []
        subs = [p for p in root.iterdir() if p.is_dir()]
        splits = [p for p in subs if p.name.lower() in ("train", "val", "test")]
        return sorted({c.name for s in splits or [root] for c in s.iterdir() if c.is_dir()})
    except (OSError, ValueError):
        return []


def set_for_datamodule(datamodule_cfg: Any) -> str:
    """The corruption set for a datamodule config (``evaluation.corruptions.set: auto``): by
    its class, its MedMNIST flag, or its augmentation preset (``xray``, ``dermoscopy``);
    ``general`` otherwise. An X-ray folder whose classes name pneumonia (the Kermany release's
    ``NORMAL`` / ``PNEUMONIA``) gets PneumoniaMNIST's set, ``xray_pneumonia``."""
    cls = str(datamodule_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    if cls in _BY_DATAMODULE:
        return _BY_DATAMODULE[cls]
    flag = str(datamodule_cfg.get("flag", "") or "").lower()
    if flag in _BY_MEDMNIST:
        return _BY_MEDMNIST[flag]
    aug = datamodule_cfg.get("augmentation")
    if aug == "xray" and any("pneumonia" in c.lower() for c in _class_names(datamodule_cfg)):
        return "xray_pneumonia"
    return aug if isinstance(aug, str) and aug in CORRUPTION_SETS else "general"


def get_set(name: str) -> dict[str, Corruption]:
    if name not in CORRUPTION_SETS:
        raise ValueError(f"corruption set {name!r} is not one of {sorted(CORRUPTION_SETS)}")
    return CORRUPTION_SETS[name]


def image_rng(seed: int, index: int, corruption: str) -> np.random.Generator:
    """The generator for one image under one corruption: the same numbers for the same
    arguments, whatever the batch or the order of evaluation. It does not depend on the
    severity: the severities of a corruption share its random draws (noise pattern, blur
    direction, text) and differ only in strength."""
    return np.random.default_rng([int(seed), int(index), zlib.crc32(corruption.encode())])


def corrupt(img: np.ndarray, corruption: str, severity: int, set_name: str = "general",
            seed: int = 0, index: int = 0) -> np.ndarray:
    """``img`` (``uint8 (H, W, C)``) under ``corruption`` of ``set_name`` at ``severity``
    (1..5), deterministic for ``(seed, index)``."""
    cset = get_set(set_name)
    if corruption not in cset:
        raise ValueError(f"corruption {corruption!r} is not in the {set_name} set: "
                         f"{sorted(cset)}")
    return cset[corruption](img, severity, image_rng(seed, index, corruption))


def to_uint8(x) -> np.ndarray:
    """A ``(B, C, H, W)`` float tensor in [0, 1] as ``uint8 (B, H, W, C)`` (exact for tensors
    the datasets made from uint8 images)."""
    return (x.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1) \
        .cpu().numpy()


def from_uint8(imgs: np.ndarray):
    """``uint8 (B, H, W, C)`` back to a float ``(B, C, H, W)`` tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float().div_(255)


# ------------------------------------------------------------------- perturbation sequences
#: kind -> the frame parameter at the last frame (frame 0 is the clean image)
SEQUENCE_KINDS = {"gaussian_noise": 0.1, "gaussian_blur": 1.5, "brightness": 0.3,
                  "rotate": 15.0, "translate": 0.1, "scale": 0.2}


def sequence_frames(img: np.ndarray, kind: str, frames: int, rng: np.random.Generator
                    ) -> list[np.ndarray]:
    """``frames`` images of growing perturbation, the first the image itself (the ImageNet-P
    idea, Hendrycks & Dietterich 2019): Gaussian noise (one noise pattern scaled up to std
    0.1), Gaussian blur (sigma up to 1.5 px at 224 px), brightness (up to +30%), rotation
    (up to 15 degrees), translation (up to 10% of the side) and scale (up to +20%)."""
    import albumentations as A
    import cv2

    if kind not in SEQUENCE_KINDS:
        raise ValueError(f"sequence kind {kind!r} is not one of {sorted(SEQUENCE_KINDS)}")
    if frames < 2:
        raise ValueError(f"frames={frames} must be at least 2")
    top, scale = SEQUENCE_KINDS[kind], min(img.shape[:2]) / REFERENCE_SIDE
    noise = rng.normal(0.0, 1.0, img.shape).astype(np.float32) if kind == "gaussian_noise" \
        else None
    out = [img]
    for t in range(1, frames):
        v = top * t / (frames - 1)
        if kind == "gaussian_noise":
            f = _uint8(_float(img) + v * noise)
        elif kind == "gaussian_blur":
            f = _gaussian(img, v * scale, rng)
        elif kind == "brightness":
            f = brightness(img, 1 + v, rng, scale)
        else:
            geo = {"rotate": {"rotate": (v, v)},
                   "translate": {"translate_percent": {"x": (v, v), "y": (0, 0)}},
                   "scale": {"scale": (1 + v, 1 + v)}}[kind]
            f = _albu(A.Affine(**geo, border_mode=cv2.BORDER_REFLECT_101, p=1), img, rng)
        out.append(np.ascontiguousarray(f.reshape(img.shape)))
    return out


# ------------------------------------------------------------------------------ augmentation
class CorruptionAugment:
    """A training augmentation from a corruption set (MedMNIST-C's augmentation): with
    probability ``p``, one corruption of ``set`` drawn uniformly at a severity drawn uniformly
    from 1..5. albumentations-style: ``aug(image=uint8 HWC) -> {"image": ...}``; seeded with
    :meth:`set_random_seed` (``datamodules.augment`` does that per run, rank and worker)."""

    def __init__(self, set: str = "general", p: float = 0.5, base: Any = None) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"CorruptionAugment: p={p} must be in [0, 1]")
        self.corruptions = get_set(set)
        self.names = sorted(self.corruptions)
        self.set_name, self.p, self.base = set, float(p), base
        self.rng = np.random.default_rng(0)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(int(seed))
        if self.base is not None and hasattr(self.base, "set_random_seed"):
            self.base.set_random_seed(int(seed))

    def __call__(self, image: np.ndarray, **kwargs) -> dict[str, Any]:
        if self.base is not None:
            image = self.base(image=image, **kwargs)["image"]
        if self.rng.random() < self.p:
            name = self.names[int(self.rng.integers(len(self.names)))]
            cor = self.corruptions[name]
            image = cor(image, int(self.rng.integers(1, len(cor.severities) + 1)), self.rng)
        return {"image": image}

    def __repr__(self) -> str:
        return f"CorruptionAugment(set={self.set_name!r}, p={self.p}, base={self.base!r})"
