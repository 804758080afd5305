"""Common corruptions (lightning_modules/evaluation/corruptions/images.py) and their benchmark
(lightning_modules/evaluation/corruptions/benchmark.py): severity, dtype, range and seeds; CE / mCE and the
flip probability against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datamodules.augment import build_augmentation
from datamodules.synthetic import make_synthetic
from lightning_modules.evaluation.corruptions.benchmark import (
    corruption_errors,
    corruption_scores,
    flip_probability,
    flip_rate,
    mce,
    summarise,
)
from lightning_modules.evaluation.corruptions.images import (
    CORRUPTION_SETS,
    SEQUENCE_KINDS,
    CorruptionAugment,
    corrupt,
    from_uint8,
    image_rng,
    sequence_frames,
    set_for_datamodule,
    to_uint8,
)

CELLS = [(s, c) for s in CORRUPTION_SETS for c in CORRUPTION_SETS[s]]
# published parameters that do not grow at every severity, or stay below a pixel at 64 px
SAME_AT = {("blood", "stain_deposit"): {3, 4}}  # severities 3-5: at most 3 marks
# radii 0.5-2.5 px at 224 px, alias blur 0.6, 0.5, 0.1, 0.5, 0.1: at 64 px the published
# alias blur decides, and it is not monotone
NOT_MONOTONE = {("oct", "defocus_blur")}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four 64 px RGB images with texture, edges and a lesion-like blob, as uint8 (N, H, W, C)."""
    x, _ = make_synthetic(4, 4, image_size=64, signal_amplitude=0.3, seed=1)
    yy, xx = np.mgrid[0:64, 0:64]
    blob = ((yy - 30) ** 2 + (xx - 34) ** 2 < 18**2)[..., None] * np.array([-0.25, -0.3, -0.2])
    imgs = np.clip(to_uint8(x).astype(np.float32) / 255 * 0.8 + 0.15 + blob, 0, 1)
    return (imgs * 255).round().astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize(("set_name", "name"), CELLS)
def test_severity_changes_the_image_more_keeps_dtype_and_is_seeded(images, set_name, name):
    psnr = []
    for s in range(1, 6):
        out = [corrupt(img, name, s, set_name, seed=0, index=i) for i, img in enumerate(images)]
        assert all(o.dtype == np.uint8 and o.shape == images[0].shape for o in out)
        psnr.append(np.mean([_psnr(o, img) for o, img in zip(out, images, strict=True)]))
        again = corrupt(images[0], name, s, set_name, seed=0, index=0)
        np.testing.assert_array_equal(again, out[0])  # same seed and image: same output
    # strictly falling once the image changes at all (a blur below a pixel at 64 px, e.g. the
    # X-ray set's 3 px Gaussian at 224 px, leaves it unchanged at severity 1)
    changed = [p for p in psnr if p < 99]
    if (set_name, name) in NOT_MONOTONE:
        return
    assert len(changed) >= 4, f"{name} does nothing at severities 1-2 on 64 px images"
    same = SAME_AT.get((set_name, name), set())
    assert all(d <= 1e-9 if s + 1 in same else d < 0 for s, d in enumerate(np.diff(psnr), 1)
               if psnr[s - 1] < 99), f"{name}: PSNR {np.round(psnr, 2)}"


def test_grayscale_images_and_other_seeds():
    img = (np.linspace(0, 255, 32 * 32).reshape(32, 32, 1)).astype(np.uint8)
    for set_name in ("xray", "general"):
        for name in CORRUPTION_SETS[set_name]:
            out = corrupt(img, name, 3, set_name)
            assert out.shape == (32, 32, 1) and out.dtype == np.uint8
    a = corrupt(img, "gaussian_noise", 3, "xray", seed=0)
    assert not np.array_equal(a, corrupt(img, "gaussian_noise", 3, "xray", seed=1))
    assert not np.array_equal(a, corrupt(img, "gaussian_noise", 3, "xray", seed=0, index=1))
    with pytest.raises(ValueError, match="severity 6"):
        corrupt(img, "gaussian_noise", 6, "xray")
    with pytest.raises(ValueError, match="not in the xray set"):
        corrupt(img, "black_corner", 1, "xray")
    with pytest.raises(ValueError, match="uint8"):
        CORRUPTION_SETS["xray"]["gaussian_noise"](img.astype(np.float32), 1, image_rng(0, 0,
                                                                                   "x"))


def test_uint8_round_trip_is_exact():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(from_uint8(imgs)), imgs)


def test_set_chosen_per_datamodule():
    assert set_for_datamodule({"_target_": "datamodules.ham10000.HAM10000DataModule"}) \
        == "dermoscopy"
    assert set_for_datamodule({"_target_": "datamodules.chestxray14.ChestXray14DataModule"}) \
        == "xray"
    assert set_for_datamodule({"_target_": "datamodules.medmnist.MedMNISTDataModule",
                               "flag": "retinamnist"}) == "fundus"
    assert set_for_datamodule({"_target_": "datamodules.generic.FolderDataModule",
                               "augmentation": "xray"}) == "xray"  # e.g. the pneumonia X-rays
    assert set_for_datamodule({"_target_": "x.Other", "augmentation": "flips"}) == "general"


def test_medmnist_flags_get_their_medmnist_c_sets():
    expected = {"dermamnist": "dermoscopy", "chestmnist": "xray", "retinamnist": "fundus",
                "pneumoniamnist": "xray_pneumonia", "pathmnist": "pathology",
                "bloodmnist": "blood", "tissuemnist": "tissue", "octmnist": "oct",
                "breastmnist": "breast_ultrasound", "organamnist": "abdominal_ct",
                "organcmnist": "abdominal_ct", "organsmnist": "abdominal_ct"}
    for flag, name in expected.items():
        assert set_for_datamodule({"_target_": "datamodules.medmnist.MedMNISTDataModule",
                                   "flag": flag}) == name, flag
    # PneumoniaMNIST's set is milder than ChestMNIST's (published severities 1 and 5)
    pneu, chest = CORRUPTION_SETS["xray_pneumonia"], CORRUPTION_SETS["xray"]
    assert pneu["gaussian_noise"].severities == (0.04, 0.05, 0.06, 0.07, 0.08)
    assert pneu["shot_noise"].severities == (300, 200, 150, 100, 80)
    assert pneu["pixelate"].severities == (0.8, 0.7, 0.6, 0.5, 0.40)
    assert chest["gaussian_noise"].severities[-1] == 0.26
    assert CORRUPTION_SETS["pathology"]["bubble"].severities[-1] == (17, 25)
    assert CORRUPTION_SETS["blood"]["stain_deposit"].severities[-1] == (3, 32)


def test_pneumonia_folder_gets_the_pneumoniamnist_set(tmp_path):
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (tmp_path / "chest_xray" / split / cls).mkdir(parents=True)
    kermany = {"_target_": "datamodules.generic.FolderDataModule", "augmentation": "xray",
               "data_dir": str(tmp_path / "chest_xray"), "classes": None}
    assert set_for_datamodule(kermany) == "xray_pneumonia"
    assert set_for_datamodule({**kermany, "data_dir": str(tmp_path / "missing")}) == "xray"
    assert set_for_datamodule({**kermany, "data_dir": str(tmp_path / "missing"),
                               "classes": ["normal", "pneumonia"]}) == "xray_pneumonia"


def test_mce_matches_a_hand_computed_example():
    # model errors per severity: a: 0.2, 0.4; b: 0.5, 0.5; clean 0.1
    # baseline: a: 0.4, 0.4; b: 0.25, 0.25; clean 0.2
    errors = {"a": {"1": 0.2, "2": 0.4}, "b": {"1": 0.5, "2": 0.5}}
    base = {"a": {"1": 0.4, "2": 0.4}, "b": {"1": 0.25, "2": 0.25}}
    out = mce(errors, 0.1, base, 0.2)
    assert out["ce"] == pytest.approx({"a": 0.6 / 0.8, "b": 1.0 / 0.5})
    assert out["mce"] == pytest.approx((0.75 + 2.0) / 2)
    # relative: a: (0.6 - 0.2) / (0.8 - 0.4) = 1; b: (1.0 - 0.2) / (0.5 - 0.4) = 8
    assert out["relative_ce"] == pytest.approx({"a": 1.0, "b": 8.0})
    assert out["relative_mce"] == pytest.approx(4.5)
    same = mce(errors, 0.1, errors, 0.1)
    assert same["mce"] == pytest.approx(1.0) and same["relative_mce"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different"):
        mce(errors, 0.1, {"a": base["a"]}, 0.2)


def test_summary_and_errors_from_a_table():
    result = {"score_metric": "bal_acc", "clean": {"acc": 0.9, "bal_acc": 0.8},
              "table": {"a": {"1": {"acc": 0.8, "bal_acc": 0.6},
                              "2": {"acc": 0.6, "bal_acc": 0.4}}}}
    summary = summarise(result)
    assert summary["per_corruption"]["a"] == pytest.approx(
        {"score": 0.5, "acc": 0.7, "drop": 0.3, "relative_drop": 0.3 / 0.8})
    assert summary["mean"]["score"] == pytest.approx(0.5)
    errors, clean = corruption_errors(result)
    assert errors["a"] == pytest.approx({"1": 0.4, "2": 0.6}) and clean == pytest.approx(0.2)


def test_flip_rate_hand_example_and_zero_for_a_constant_model(images):
    preds = torch.tensor([[0, 1], [0, 1], [1, 1], [0, 1]])  # image 0 flips twice in 3 steps
    assert flip_rate(preds) == pytest.approx(2 / 6)
    findings = torch.zeros(3, 2, 4, dtype=torch.bool)
    findings[1, 0, 2] = True  # one finding on, then off again
    assert flip_rate(findings) == pytest.approx(2 / (2 * 2 * 4))

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 3)

    x = from_uint8(images)
    out = flip_probability(Constant(), [(x[:3], None), (x[3:], None)], "multiclass", frames=4)
    assert out["kinds"] == {k: 0.0 for k in SEQUENCE_KINDS} and out["n_images"] == 4


def test_sequences_start_clean_and_grow(images):
    for kind in SEQUENCE_KINDS:
        frames = sequence_frames(images[0], kind, 5, image_rng(0, 0, kind))
        assert len(frames) == 5 and np.array_equal(frames[0], images[0])
        psnr = [_psnr(f, images[0]) for f in frames[1:]]
        changed = [p for p in psnr if p < 99]
        assert len(changed) >= 2 and all(np.diff(psnr) <= 0) and all(np.diff(changed) < 0), \
            (kind, psnr)


def test_scores_do_not_depend_on_the_batch_size(trained_model):
    model, x, y = trained_model
    whole = corruption_scores(model, [(x[:16], y[:16])], "multiclass", 4, "general", (1, 5))
    split = corruption_scores(model, [(x[:7], y[:7]), (x[7:16], y[7:16])], "multiclass", 4,
                              "general", (1, 5))
    assert whole["table"] == split["table"] and whole["n_images"] == 16
    with torch.no_grad():
        clean_acc = (model(x[:16]).argmax(1) == y[:16]).float().mean().item()
    assert whole["clean"]["acc"] == pytest.approx(clean_acc)
    noise = whole["table"]["gaussian_noise"]
    assert noise["5"]["acc"] <= noise["1"]["acc"]
    # at 16 px the mildest defocus stays below a pixel: reported, not hidden
    assert whole["unchanged"] == {"defocus_blur": [1]}


def test_clean_score_goes_through_the_uint8_round_trip_and_unchanged_is_reported(caplog):
    """A corruption that leaves every image unchanged scores exactly the clean score (both
    through uint8), and is named in ``unchanged`` with a warning."""

    class Sharp(nn.Module):  # flips with the image's least significant bits
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            odd = ((x * 255) % 2 > 0.5).float().mean(dim=(1, 2, 3))
            return torch.stack([odd, 1 - odd + self.w], dim=1)

    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (6, 1, 32, 32), generator=g).float() + 0.4) / 255  # off-grid
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    with caplog.at_level("WARNING"):
        out = corruption_scores(Sharp(), [(x, y)], "multiclass", 2, "xray", (1, 5))
    # the X-ray set's 3 px Gaussian at 224 px is ~0.1 px at 32 px: nothing changes
    assert out["unchanged"] == {"gaussian_blur": [1]}
    assert out["table"]["gaussian_blur"]["1"] == out["clean"]
    assert "gaussian_blur at severity 1" in caplog.text


def test_corruption_augmentation_preset_is_seeded(images):
    aug = build_augmentation("dermoscopy_c", 3)
    assert isinstance(aug, CorruptionAugment) and aug.set_name == "dermoscopy"
    aug.set_random_seed(5)
    first = [aug(image=img)["image"] for img in images]
    aug.set_random_seed(5)
    again = [aug(image=img)["image"] for img in images]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(a.dtype == np.uint8 and a.shape == images[0].shape for a in first)
    changed = sum(not np.array_equal(a, img) for a, img in zip(first, images, strict=True))
    assert changed >= 1  # the geometric preset and, with p=0.5, a corruption
    never = CorruptionAugment("xray", p=0.0)
    np.testing.assert_array_equal(never(image=images[0])["image"], images[0])
    with pytest.raises(ValueError, match="p=2"):
        CorruptionAugment("xray", p=2)


def test_baseline_report_must_match_the_images_and_corruptions(tmp_path):
    from lightning_modules.core.errors import ConfigError
    from lightning_modules.core.io import write_json
    from lightning_modules.evaluation.corruptions.benchmark import corruption_baseline
    from lightning_modules.evaluation.schema import EvalReport

    def report(corruptions):  # a schema-valid report.json holding this corruption block
        rep = EvalReport(
            checkpoint="x.ckpt", epoch=0, dataset=None, backbone=None, defense=None,
            train_threat={}, task="multiclass", num_classes=2, class_names=None,
            score_metric="bal_acc", chance={}, split="test", n_images=10, subset=None,
            threat_model={}, evaluation=None, precision="32", devices=1, clean={},
            attacks={}, skipped_attacks={}, cascade=False, cost={}, gap=None,
            worst_case=None, results=[], corruptions=corruptions)
        write_json(tmp_path / "report.json", rep.as_dict())

    mine = {"set": "xray", "severities": [1, 2], "seed": 0, "n_images": 10}
    never = lambda model: pytest.fail("a report baseline is read, not measured")  # noqa: E731
    args = ("multiclass", 2, never, "cpu")
    report({**mine, "seed": 1})
    with pytest.raises(ConfigError, match="seed=1.*not the same images"):
        corruption_baseline(str(tmp_path), mine, never, *args)
    report(None)
    with pytest.raises(ConfigError, match="no corruption results"):
        corruption_baseline(str(tmp_path / "report.json"), mine, never, *args)
    (tmp_path / "other.json").write_text('{"clean": {}}')  # not a medrobust report
    with pytest.raises(ConfigError, match="not a medrobust report"):
        corruption_baseline(str(tmp_path / "other.json"), mine, never, *args)
    with pytest.raises(ConfigError, match="no such file"):
        corruption_baseline(str(tmp_path / "missing.ckpt"), mine, never, *args)
    good = {**mine, "table": {}, "flip_probability": {"kinds": {}}}
    report(good)
    assert corruption_baseline(str(tmp_path), mine, never, *args) == (good, {"kinds": {}})


def test_empty_severities_are_a_config_error(tmp_path):
    from omegaconf import OmegaConf

    from lightning_modules.core.errors import ConfigError
    from lightning_modules.evaluation.corruptions.benchmark import corruption_benchmark

    spec = OmegaConf.create({"set": "xray", "severities": [], "images": None, "batch_size": 4,
                             "baseline": None, "sequences": [], "frames": 3})
    with pytest.raises(ConfigError, match=r"severities=\[\] must be a non-empty list"):
        corruption_benchmark(spec, nn.Linear(1, 1), "xray", None, "test", "multiclass", 2, 0,
                             tmp_path, load_baseline=lambda p: pytest.fail("not called"))
