"""The corruptions against their references, pixel by pixel, on a fixed 16 px RGB image.

Expected values were computed with the reference implementations (medmnistc 0.1.0 for
MedMNIST-C; ImageNet-C's ``make_imagenet_c.py`` formulas with scikit-image 0.23 for the
``general`` set; ImageMagick 6 through Wand for the motion-blur kernel) and are hard-coded
here: neither is a dependency of the project or of these tests. Where the reference truncates
a float that lands within rounding error of an integer, a difference of 1 is allowed."""

from __future__ import annotations

from math import erf, sqrt

import cv2
import numpy as np
import pytest

from lightning_modules.evaluation.corruptions import images as I
from lightning_modules.evaluation.corruptions.inks import inks

PTS = [(0, 0), (3, 7), (6, 6), (8, 12), (15, 15)]


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    """16x16 RGB: ramps in R and G, a product pattern in B, a red rectangle."""
    yy, xx = np.mgrid[0:16, 0:16]
    out = np.stack([xx * 16, yy * 16, (xx * yy) % 256], -1).astype(np.uint8)
    out[4:9, 5:11] = (220, 40, 30)
    return out


def _at(out: np.ndarray) -> list:
    return [out[p].tolist() for p in PTS]


# medmnistc 0.1.0 on the image above (PIL in, np.array out), severity parameter as given
REFERENCE = {
    ("jpeg_compression", 30): [[0, 9, 0], [165, 31, 30], [184, 58, 43], [198, 110, 86],
                               [255, 223, 198]],
    ("brightness", 1.3): [[0, 0, 0], [145, 62, 27], [255, 52, 39], [249, 166, 124],
                          [255, 255, 255]],
    ("contrast", 0.6): [[44, 44, 44], [112, 73, 57], [176, 68, 62], [160, 121, 102],
                        [188, 188, 179]],
    ("gamma", 1.4): [[0, 0, 0], [80, 24, 7], [208, 19, 12], [172, 97, 65], [235, 235, 214]],
    ("gamma", 0.6): [[0, 0, 0], [156, 93, 57], [234, 84, 70], [215, 169, 142],
                     [246, 246, 237]],
    ("saturate", 0.15): [[0, 0, 0], [112, 36, 4], [220, 11, 0], [192, 108, 67],
                         [240, 240, 188]],
    ("zoom_blur", (1.21, 0.02)): [[4, 4, 0], [120, 44, 20], [220, 40, 30], [187, 111, 80],
                                  [223, 223, 195]],
    # ImageNet-C (general set): brightness adds to the HSV value, contrast per channel
    ("brightness_hsv", 0.1): [[25, 25, 25], [137, 58, 25], [245, 44, 33], [217, 145, 108],
                              [255, 255, 239]],
    ("brightness_hsv", 0.3): [[76, 76, 76], [188, 80, 35], [255, 46, 34], [255, 170, 127],
                              [255, 255, 239]],
    ("contrast_channel", 0.4): [[79, 68, 32], [123, 87, 41], [167, 84, 44], [155, 119, 71],
                                [175, 164, 122]],
    ("contrast_channel", 0.1): [[118, 102, 49], [129, 106, 51], [140, 106, 52],
                                [137, 114, 58], [142, 126, 71]],
}
EXACT = {"jpeg_compression", "brightness", "contrast", "gamma"}  # same library or table


@pytest.mark.parametrize(("kind", "param"), list(REFERENCE))
def test_matches_the_reference_pixels(img, kind, param):
    out = I.KINDS[kind](img, param, np.random.default_rng(0), 1.0)
    assert out.dtype == np.uint8 and out.shape == img.shape
    got, want = np.array(_at(out)), np.array(REFERENCE[kind, param])
    if kind in EXACT:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, atol=1)


def test_jpeg_keeps_the_colours():
    """OpenCV's encoder reads RGB as BGR: a red patch would come back with its chroma
    swapped. Through PIL red stays red."""
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 200
    out = I.jpeg_compression(red, 30, None, 1.0)
    assert out[..., 0].mean() > 180 and out[..., 2].mean() < 20


def test_impulse_noise_flips_each_channel_like_skimage(img):
    """``skimage.util.random_noise(x, "s&p", amount=0.09, rng=default_rng(7))``, as both
    MedMNIST-C and ImageNet-C call it: channels flip independently."""
    out = I.impulse_noise(img, 0.09, np.random.default_rng(7), 1.0)
    assert _at(out) == [[0, 0, 0], [112, 48, 21], [220, 40, 255], [192, 128, 255],
                        [240, 240, 225]]
    changed = out != img
    partial = changed.any(-1) & ~changed.all(-1)
    assert partial.sum() > 0  # some pixels flipped in one channel only


def test_noises_follow_their_formulas(img):
    x = img / 255.0
    for kind, p, formula in (
            ("gaussian_noise", 0.08, lambda r: x + r.normal(0.0, 0.08, x.shape)),
            ("speckle_noise", 0.2, lambda r: x + x * r.normal(0.0, 0.2, x.shape)),
            ("shot_noise", 25, lambda r: r.poisson(x * 25) / 25)):
        out = I.KINDS[kind](img, p, np.random.default_rng(3), 1.0)
        ref = (np.clip(formula(np.random.default_rng(3)), 0, 1) * 255).astype(np.uint8)
        assert np.abs(out.astype(int) - ref).max() <= 1, kind  # float32 vs float64


def test_grey_images_are_corrupted_as_rgb_then_converted_to_luminance():
    """MedMNIST-C corrupts its grey sets as RGB and converts back with PIL's ``L``: the
    three channels' independent noise averages to about 0.67 of its std."""
    grey = np.full((32, 32, 1), 128, np.uint8)
    cor = I.Corruption("gaussian_noise", (0.1,))
    out = cor(grey, 1, np.random.default_rng(5))
    rgb = I.gaussian_noise(np.repeat(grey, 3, -1), 0.1, np.random.default_rng(5), 1.0)
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    want = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    np.testing.assert_array_equal(out[..., 0], want)
    assert 0.6 < out.std() / rgb.std() < 0.75
    # deterministic corruptions are unchanged by the detour
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_array_equal(I.Corruption("contrast", (0.6,))(ramp, 1, None)[..., 0],
                                  I.contrast(np.repeat(ramp, 3, -1), 0.6, None, 1)[..., 0])


def test_motion_kernel_reaches_twice_the_radius_like_imagemagick():
    """ImageMagick's kernel for radius 3, sigma 2 at angle 0 (Wand's ``motion_blur`` on a
    single white pixel, normalised; 8-bit quantised): taps at 0..5 px, the 6th below 1/255."""
    wand = [0.336, 0.296, 0.204, 0.108, 0.044, 0.012]
    k = I.motion_kernel(3.0, 2.0, 0.0)
    h = k.shape[0] // 2
    row = k[h, h:]
    np.testing.assert_allclose(row[:6], wand, atol=0.005)
    w = np.exp(-np.arange(7) ** 2 / 8.0)
    np.testing.assert_allclose(row[:7], w / w.sum(), rtol=1e-9)  # exp(-i^2 / 2 sigma^2)
    assert row[6] > 0 and row[7:].sum() == 0 and k.sum() == pytest.approx(1.0)
    assert k[:h].sum() == 0 and k[h + 1:].sum() == 0 and k[h, :h].sum() == 0  # one-sided


def test_gaussian_blur_taps_integrate_the_continuous_gaussian():
    def taps(sigma, r):
        phi = [0.5 * (1 + erf((i - 0.5) / (sqrt(2) * sigma))) for i in range(-r, r + 2)]
        t = np.diff(phi)
        return t / t.sum()

    np.testing.assert_allclose(I.gaussian_kernel_1d(0.23), taps(0.23, 1), rtol=1e-12)
    np.testing.assert_allclose(I.gaussian_kernel_1d(0.23), [0.014856, 0.970288, 0.014856],
                               atol=1e-6)
    np.testing.assert_allclose(I.gaussian_kernel_1d(1.0), taps(1.0, 3), rtol=1e-12)
    # torchvision's 3-tap kernel (sigma 0.8, truncated at 1 px) has a std of 0.6914
    w = np.exp(-1 / (2 * 0.8**2))
    assert I.torchvision_sigma(3) == pytest.approx(sqrt(2 * w / (1 + 2 * w)))
    assert I.torchvision_sigma(3) == pytest.approx(0.69137, abs=1e-5)
    # severity 1 of the X-ray set blurs a 64 px image (it left it bit-identical before)
    edge = np.zeros((64, 64, 1), np.uint8)
    edge[:, 32:] = 200
    out = I.corrupt(edge, "gaussian_blur", 1, "xray_pneumonia")
    assert not np.array_equal(out, edge)
    sigma = 0.69137 * 64 / 224  # 0.198 px: one tail tap of 0.0057 reaches over the edge
    tail = taps(sigma, 1)[0]
    assert tail == pytest.approx(0.0057, abs=1e-4)
    assert out[0, 31, 0] == round(200 * tail) == 1 and out[0, 32, 0] == round(200 * (1 - tail))


def test_zoom_blur_is_the_clipped_zoom_average():
    """Hand-computed: a 4 px ramp, factor 1.5: crop ceil(4 / 1.5) = 3 px from (4 - 3) // 2 =
    0, zoomed corner-aligned to round(4.5) = 4 px (samples at 0, 2/3, 4/3, 2), trimmed from
    0."""
    x = np.array([0.0, 0.25, 0.5, 0.75], np.float32).reshape(4, 1, 1) * np.ones((1, 4, 1))
    z = I.clipped_zoom(x.astype(np.float32), 1.5)
    np.testing.assert_allclose(z[:, 0, 0], [0.0, 1 / 6, 1 / 3, 0.5], atol=1e-6)
    # np.arange(1, 1.11, 0.01) has 12 factors (1.00 ... 1.11): image + 12 zooms, / 13
    assert len(np.arange(1.0, 1.11, 0.01)) == 12


def test_characters_use_duplex_thickness_1(img, monkeypatch):
    calls = []
    real = cv2.putText

    def spy(mask, text, org, font, scale, colour, thickness, line):
        calls.append((font, thickness, line, scale))
        return real(mask, text, org, font, scale, colour, thickness, line)

    monkeypatch.setattr(cv2, "putText", spy)
    I.characters(img, (4, 9, 0.17), np.random.default_rng(1), 1.0)
    assert calls and all(c[:3] == (cv2.FONT_HERSHEY_DUPLEX, 1, cv2.LINE_AA) for c in calls)
    assert all(0.14 <= c[3] <= 0.17 for c in calls)


def test_pixelate_changes_nothing_at_ratio_1_and_grows_with_severity():
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (64, 64),
                     interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(I.pixelate(img, 1.0, None, 64 / 224), img)
    err = [np.abs(I.pixelate(img, c, None, 64 / 224).astype(int) - img).mean()
           for c in (0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.1)]
    assert all(np.diff(err) > 0), err


def test_histology_inks_and_bubbles():
    assert inks(24).shape == (10, 24, 24) and inks(32).shape == (10, 32, 32)
    assert int(inks(24)[0].sum()) == 310 and int(inks(32)[9].sum()) == 478
    assert inks(24)[0][12].tolist() == [0] * 3 + [1] * 16 + [0] * 5
    grey = np.full((64, 64, 3), 120, np.uint8)
    stained = I.corrupt(grey, "stain_deposit", 5, "pathology")
    assert stained.min() == 0 and (stained <= 120).all()  # black ink only darkens
    bubbled = I.corrupt(grey, "bubble", 5, "pathology")
    assert (bubbled >= 120).all() and bubbled.max() > 150  # translucent white
