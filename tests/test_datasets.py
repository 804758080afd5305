"""Every dataset format from a tiny fixture in its published layout, end to end through train.py;
splits, grouping, bad input, the cache, augmentation, class balance and per-class metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules import from_config
from datamodules.augment import build_augmentation
from datamodules.base import balanced_class_weights, sample_weights
from datamodules.chestxray14 import FINDINGS, parse_findings
from tests import layouts
from tests.conftest import SHARED_HAM
from train import train

LOADER = {"image_size": 16, "num_workers": 0, "batch_size": 8}
FAST_DATA = ["datamodule.image_size=16", "datamodule.num_workers=0", "datamodule.batch_size=8"]


def _groups_disjoint(groups: np.ndarray, split_idx: dict) -> bool:
    seen = {s: set(groups[idx].tolist()) for s, idx in split_idx.items()}
    return all(not (seen[a] & seen[b]) for a in seen for b in seen if a < b)


# ----------------------------------------------------------------------------------- ISIC
def test_isic2018_official_splits_and_lesions(tmp_path):
    root = layouts.write_isic2018(tmp_path / "isic2018", n_test=14)
    dm = from_config("isic2018", data_dir=str(root), **LOADER)
    assert dm.class_names == layouts.ISIC2018_CLASSES and dm.num_classes == 7
    n = {s: len(v) for s, v in dm.split_idx.items()}
    assert n["val"] == 14 and n["test"] == 14 and n["train"] == 42  # official sets as shipped
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long


def test_isic2018_without_test_carves_it_by_lesion(tmp_path):
    root = layouts.write_isic2018(tmp_path / "isic2018", n_train=84, n_test=0)
    dm = from_config("isic2018", data_dir=str(root), test_fraction=0.25, **LOADER)
    assert len(dm.split_idx["val"]) == 14  # the official validation set
    assert _groups_disjoint(dm.table.groups, {k: dm.split_idx[k] for k in ("train", "test")})
    assert len(set(dm.table.groups[dm.split_idx["train"]])) < len(dm.split_idx["train"])


def test_isic2019_layout_groups_and_unk(tmp_path):
    root = layouts.write_isic2019(tmp_path / "isic2019")
    dm = from_config("isic2019", data_dir=str(root), test_fraction=0.25, val_fraction=0.25, **LOADER)
    assert dm.class_names == layouts.ISIC2019_CLASSES and dm.num_classes == 9
    assert _groups_disjoint(dm.table.groups, dm.split_idx)
    assert dm.class_counts("train")["UNK"] == 0


def test_isic2019_trains_end_to_end(train_cfg, tmp_path):
    root = layouts.write_isic2019(tmp_path / "isic2019")
    result = train(train_cfg("datamodule=isic2019", f"datamodule.data_dir={root}",
                             "datamodule.val_fraction=0.25", "datamodule.test_fraction=0.25",
                             *FAST_DATA))
    assert 0 <= result["test"]["test/adv_bal_acc"] <= 1
    assert "test/recall/MEL" in result["test"] and "test/adv_recall/SCC" in result["test"]


def test_isic_bad_ground_truth(tmp_path):
    root = layouts.write_isic2018(tmp_path / "isic2018")
    gt = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    text = gt.read_text().splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + ",1.0"  # a second 1 in the row
    gt.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="exactly one class"):
        from_config("isic2018", data_dir=str(root), **LOADER)
    with pytest.raises(FileNotFoundError, match="ISIC2018_Task3_Training_GroundTruth.csv"):
        from_config("isic2018", data_dir=str(root / "ISIC2018_Task3_Training_Input"), **LOADER)


# ---------------------------------------------------------------------------- ChestX-ray14
def test_parse_findings_order_and_no_finding():
    y = parse_findings(["No Finding", "Effusion|Atelectasis", "Hernia"], "csv")
    assert y.shape == (3, 14) and y[0].sum() == 0
    assert y[1, FINDINGS.index("Atelectasis")] == 1 and y[1, FINDINGS.index("Effusion")] == 1
    assert y[2, 13] == 1 and FINDINGS[0] == "Atelectasis" and FINDINGS[13] == "Hernia"
    with pytest.raises(ValueError, match="Covid"):
        parse_findings(["Covid|Mass"], "Data_Entry_2017.csv")


def test_chestxray14_official_split_and_patients(tmp_path):
    root = layouts.write_chestxray14(tmp_path / "cxr")
    dm = from_config("chestxray14", data_dir=str(root), val_fraction=0.2, **LOADER)
    assert dm.task == "multilabel" and dm.num_classes == 14 and dm.in_chans == 1
    test_names = set((root / "test_list.txt").read_text().split())
    got = {dm.table.paths[i].rsplit("/", 1)[1] for i in dm.split_idx["test"]}
    assert got == test_names
    assert _groups_disjoint(dm.table.groups, dm.split_idx)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and y.shape == (8, 14) and y.dtype == torch.float32


def test_chestxray14_without_lists_splits_by_patient(tmp_path):
    root = layouts.write_chestxray14(tmp_path / "cxr", with_lists=False)
    dm = from_config("chestxray14", data_dir=str(root), val_fraction=0.2, test_fraction=0.2, **LOADER)
    assert _groups_disjoint(dm.table.groups, dm.split_idx)


def test_chestxray14_wrong_in_chans(tmp_path):
    root = layouts.write_chestxray14(tmp_path / "cxr")
    with pytest.raises(ValueError, match=r"in_chans=3 does not match.*grayscale"):
        from_config("chestxray14", data_dir=str(root), in_chans=3, **LOADER)


def test_chestxray14_trains_multilabel_end_to_end(train_cfg, tmp_path):
    root = layouts.write_chestxray14(tmp_path / "cxr")
    result = train(train_cfg("datamodule=chestxray14", f"datamodule.data_dir={root}",
                             "datamodule.val_fraction=0.2", *FAST_DATA))
    test = result["test"]
    for key in ("test/auroc", "test/adv_auroc", "test/auroc/Atelectasis", "test/adv_auroc/Hernia"):
        assert key in test, sorted(test)
    assert 0 <= test["test/adv_auroc"] <= 1


# -------------------------------------------------------------------------------- MedMNIST
def test_medmnist_flags_give_task_classes_channels(tmp_path):
    layouts.write_medmnist(tmp_path, "pathmnist")
    layouts.write_medmnist(tmp_path, "chestmnist", size=64, channels=1, labels=14, multilabel=True)
    layouts.write_medmnist(tmp_path, "pneumoniamnist", channels=1, labels=2)
    path = from_config("medmnist", flag="pathmnist", data_dir=str(tmp_path), download=False)
    assert (path.task, path.num_classes, path.in_chans) == ("multiclass", 9, 3)
    chest = from_config("medmnist", flag="chestmnist", data_dir=str(tmp_path), size=64, image_size=32,
                               download=False)
    assert (chest.task, chest.num_classes, chest.in_chans) == ("multilabel", 14, 1)
    chest.setup()
    x, y = chest.datasets["train"][0]
    assert x.shape == (1, 32, 32) and y.shape == (14,)
    pneu = from_config("medmnist", flag="pneumoniamnist", data_dir=str(tmp_path), download=False)
    assert (pneu.task, pneu.num_classes) == ("multiclass", 2)
    pneu.setup()
    assert len(pneu.datasets["val"]) == 12  # official splits kept


def test_medmnist_missing_file_and_bad_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dermamnist_64\.npz.*datamodule.data_dir"):
        from_config("medmnist", flag="dermamnist", data_dir=str(tmp_path), size=64, download=False)
    with pytest.raises(ValueError, match="not a MedMNIST"):
        from_config("medmnist", flag="cifar10", data_dir=str(tmp_path))
    layouts.write_medmnist(tmp_path, "bloodmnist", labels=8)
    with pytest.raises(ValueError, match="num_classes=5 but bloodmnist"):
        from_config("medmnist", flag="bloodmnist", data_dir=str(tmp_path), num_classes=5, download=False)


def test_medmnist_trains_end_to_end(train_cfg, tmp_path):
    layouts.write_medmnist(tmp_path, "chestmnist", channels=1, labels=14, multilabel=True)
    result = train(train_cfg("datamodule=medmnist", "datamodule.flag=chestmnist",
                             f"datamodule.data_dir={tmp_path}", "datamodule.batch_size=8",
                             "datamodule.download=false"))
    assert "test/adv_auroc" in result["test"]
    saved = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert "num_classes: 14" in saved and "in_chans: 1" in saved  # filled in from the flag


# --------------------------------------------------------------------------- folder / CSV
def test_folder_layouts(tmp_path):
    flat = from_config("folder", data_dir=str(layouts.write_folder(tmp_path / "flat")),
                            val_fraction=0.2, test_fraction=0.2, **LOADER)
    assert flat.class_names == ["benign", "malignant", "normal"] and flat.in_chans == 3
    assert sum(len(v) for v in flat.split_idx.values()) == 42
    split = from_config("folder", data_dir=str(layouts.write_folder(tmp_path / "s", splits=True)),
                             **LOADER)
    assert {k: len(v) for k, v in split.split_idx.items()} == {"train": 42, "val": 9, "test": 9}
    with pytest.raises(ValueError, match=r"\['normal'\] are not among the known classes"):
        from_config("folder", data_dir=str(tmp_path / "flat"), classes=["benign", "malignant"],
                         **LOADER)
    with pytest.raises(TypeError, match="unknown datamodule option"):
        from_config("folder", data_dir=str(tmp_path / "flat"), imagesize=16)


def test_folder_trains_with_classes_from_data(train_cfg, tmp_path):
    root = layouts.write_folder(tmp_path / "flat")
    result = train(train_cfg("datamodule=folder", f"datamodule.data_dir={root}",
                             "datamodule.val_fraction=0.2", "datamodule.test_fraction=0.2",
                             *FAST_DATA))
    assert "test/recall/malignant" in result["test"]


def test_csv_single_and_multilabel(tmp_path):
    root = layouts.write_csv_dataset(tmp_path / "single")
    dm = from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="diagnosis",
                       group_column="patient_id", val_fraction=0.2, test_fraction=0.2, **LOADER)
    assert dm.task == "multiclass" and dm.class_names == ["benign", "malignant", "normal"]
    assert _groups_disjoint(dm.table.groups, dm.split_idx)
    root = layouts.write_csv_dataset(tmp_path / "multi", multilabel=True)
    dm = from_config("csv", data_dir=str(root), csv_file="labels.csv",
                       label_columns=["finding_a", "finding_b", "finding_c"],
                       val_fraction=0.2, test_fraction=0.2, **LOADER)
    assert dm.task == "multilabel" and dm.targets("train").shape[1] == 3
    with pytest.raises(ValueError, match="exactly one of"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", **LOADER)


def test_csv_bad_input(tmp_path):
    root = layouts.write_csv_dataset(tmp_path / "d")
    for k in (3, 7, 11):
        (root / "imgs" / f"case_{k:03d}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"3 image\(s\) listed in .*labels.csv are missing"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="diagnosis")
    root = layouts.write_csv_dataset(tmp_path / "e")
    with pytest.raises(ValueError, match=r"\['normal'\] are not among the known classes"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="diagnosis",
                      classes=["benign", "malignant"])
    with pytest.raises(ValueError, match=r"lacks the columns \['dx'\]"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="dx")
    with pytest.raises(ValueError, match="cannot split .* groups"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="diagnosis",
                      group_column="patient_id", limit=None, val_fraction=0.01)
    # an empty file, or a header and no rows: one line naming the file
    (root / "labels.csv").write_text("")
    with pytest.raises(ValueError, match=r"cannot parse .*labels.csv"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="diagnosis")
    (root / "labels.csv").write_text("path,diagnosis\n")
    with pytest.raises(ValueError, match=r"labels.csv lists no images"):
        from_config("csv", data_dir=str(root), csv_file="labels.csv", label_column="diagnosis")


def test_empty_split_is_an_error(tmp_path):
    root = layouts.write_folder(tmp_path / "s", splits=True)
    for f in (root / "val").rglob("*.png"):
        f.unlink()
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    dm = from_config("folder", data_dir=str(root), val_fraction=0.2, test_fraction=0.2, **LOADER)
    assert len(dm.split_idx["val"]) > 0  # no official val/test images: carved from train
    with pytest.raises(ValueError, match="split of .* is empty"):
        from_config("folder", data_dir=str(root), val_fraction=0.2, test_fraction=0.2, limit=0,
                         **LOADER)


# ------------------------------------------------------------------- bad images and cache
@pytest.mark.parametrize("mode", ["decode", "preload", "cache"])
def test_corrupt_image_skipped_with_count_or_fatal_when_strict(tmp_path, caplog, mode):
    root = layouts.write_folder(tmp_path / "d", splits=True)
    victim = root / "train" / "malignant" / "img_004.png"
    layouts.corrupt(victim)
    extra = {"decode": {}, "preload": {"preload": True},
             "cache": {"cache_dir": str(tmp_path / "cache")}}[mode]
    with caplog.at_level("WARNING", logger="medrobust.data"):
        dm = from_config("folder", data_dir=str(root), **LOADER, **extra)
        dm.prepare_data()
        dm.setup("fit")
        n = sum(len(y) for _, y in dm.train_dataloader())
    # found at start-up, one line, left out of the split: 41 readable of 42, batches of 8
    assert caplog.text.count("unreadable") == 1
    assert "skipped 1 unreadable image(s) (strict=false): train/malignant/img_004.png" \
        in caplog.text
    assert n == 40 and len(dm.datasets["train"]) == 41
    assert dm.skipped_images() == [str(victim)]
    with pytest.raises(ValueError, match="1 unreadable image.*strict=true: train/malignant/"
                                         "img_004.png"):
        from_config("folder", data_dir=str(root), strict=True, **LOADER, **extra)


def test_cache_same_pixels_reused_and_keyed(tmp_path):
    root = layouts.write_folder(tmp_path / "d", splits=True)
    plain = from_config("folder", data_dir=str(root), augmentation="none", **LOADER)
    cached = from_config("folder", data_dir=str(root), augmentation="none",
                              cache_dir=str(tmp_path / "cache"), **LOADER)
    plain.setup()
    cached.prepare_data()
    cached.setup()
    for split in ("train", "val", "test"):
        for i in range(len(plain.datasets[split])):
            a, b = plain.datasets[split][i], cached.datasets[split][i]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 3 and all(f.name.startswith("folder-") for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = from_config("folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"), **LOADER)
    again.prepare_data()  # reused, not rebuilt
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    layouts.write_folder(root / "train", classes=("extra",), per_class=2)  # file list changes
    other = from_config("folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"),
                             classes=None, **{**LOADER})
    assert other.num_classes == 3 + 1
    other.prepare_data()
    assert len(list((tmp_path / "cache").glob("folder-train-*.npy"))) == 2
    # a cached dataset pickles without its memory map (what worker processes receive)
    import pickle

    ds = pickle.loads(pickle.dumps(cached.datasets["train"]))
    assert ds.images is None and torch.equal(ds[0][0], cached.datasets["train"][0][0])


def test_cache_with_worker_processes(tmp_path):
    root = layouts.write_folder(tmp_path / "d", splits=True)
    dm = from_config("folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"),
                          image_size=16, batch_size=8, num_workers=2)
    dm.prepare_data()
    dm.setup()
    assert sum(len(y) for _, y in dm.val_dataloader()) == 9


# ---------------------------------------------------------------- augmentation and balance
@pytest.mark.parametrize("preset", ["dermoscopy", "xray", "flips"])
@pytest.mark.parametrize("chans", [1, 3])
def test_augmentation_presets_keep_uint8_shape(preset, chans):
    aug = build_augmentation(preset, chans)
    img = np.random.default_rng(0).integers(0, 256, size=(20, 20, chans), dtype=np.uint8)
    out = aug(image=img)["image"]
    out = out[..., None] if out.ndim == 2 else out
    assert out.shape == img.shape and out.dtype == np.uint8


def test_xray_preset_has_no_horizontal_flip_and_none_is_none():
    names = [type(t).__name__ for t in build_augmentation("xray", 1).transforms]
    assert "HorizontalFlip" not in names and "Affine" in names
    assert build_augmentation("none", 3) is None and build_augmentation(None, 3) is None
    with pytest.raises(ValueError, match="not a preset"):
        build_augmentation("mixup", 3)
    custom = build_augmentation({"_target_": "albumentations.VerticalFlip", "p": 1.0}, 3)
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(custom(image=img)["image"], img[::-1])


def test_class_weights_and_sampler_weights():
    y = np.array([0] * 6 + [1] * 3 + [2])
    w = balanced_class_weights(y, 4)
    assert w[:3] == pytest.approx([10 / 18, 10 / 9, 10 / 3]) and w[3] == 0.0
    s = sample_weights(y, 4)
    assert s[0] == pytest.approx(1 / 6) and s[-1] == 1.0
    multi = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    assert balanced_class_weights(multi, 2) == pytest.approx([1 / 3, 3.0])
    assert sample_weights(multi, 2).tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1.0])


def test_weighted_sampler_balances_classes(tmp_path):
    root = layouts.write_folder(tmp_path / "d", per_class=4, splits=True)
    layouts.write_folder(root / "train", classes=("benign",), per_class=40, seed=1)
    dm = from_config("folder", data_dir=str(root), sampler="weighted", augmentation="none",
                          image_size=8, batch_size=400, num_workers=0)
    dm.setup()
    assert dm.class_counts("train")["benign"] == 40
    loader = dm.train_dataloader()
    ys = torch.cat([y for _ in range(30) for _, y in loader])
    freq = torch.bincount(ys, minlength=3).float() / len(ys)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05), freq


def test_class_weighted_loss_matches_formula(train_cfg):
    from lightning_modules.training.build import build

    cfg = train_cfg("module.class_weights=balanced")
    module = build(cfg)["module"]
    w = module.class_weights
    assert w.shape == (4,) and torch.all(w > 0)
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    expected = w[y] * torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(module.train_task.loss(logits, y), expected)
    plain = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(module.task.loss(logits, y), plain)  # evaluation stays unweighted
    result = train(train_cfg("module.class_weights=balanced", "datamodule.sampler=weighted"))
    assert 0 <= result["test"]["test/adv_bal_acc"] <= 1
    with pytest.raises(Exception, match="class_weights"):
        build(train_cfg("module.class_weights=[1.0,2.0]"))


# ---------------------------------------------------------------------- shared HAM10000
@pytest.mark.skipif(not SHARED_HAM.is_dir(), reason="../shared/datasets/ham10000 not present")
def test_shared_ham10000_cache_matches_decoding(tmp_path):
    kw = {"data_dir": str(SHARED_HAM), "image_size": 32, "num_workers": 0, "limit": 200,
          "augmentation": "none"}
    plain = from_config("ham10000", **kw)
    cached = from_config("ham10000", **kw, cache_dir=str(tmp_path / "cache"))
    plain.setup()
    cached.prepare_data()
    cached.setup()
    for i in (0, 17, len(plain.datasets["test"]) - 1):
        assert torch.equal(plain.datasets["test"][i][0], cached.datasets["test"][i][0])
    meta = json.loads(next((tmp_path / "cache").glob("ham10000-test-*.json")).read_text())
    assert meta["bad_rows"] == [] and meta["image_size"] == 32


def test_augmentation_follows_the_run_seed(ham_dir):
    """albumentations has its own generator: the same run seed must give the same augmented
    batches, with and without dataloader workers, and another seed other ones."""
    import lightning as L

    img = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)

    def draws(seed):
        torch.manual_seed(seed)
        t = build_augmentation("dermoscopy", 3)
        return [t(image=img)["image"] for _ in range(6)]

    assert all(np.array_equal(a, b) for a, b in zip(draws(7), draws(7), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(draws(7), draws(8), strict=True))

    def first_batch(seed, workers):
        L.seed_everything(seed, workers=True, verbose=False)
        dm = from_config("ham10000", data_dir=str(ham_dir), image_size=16, batch_size=8,
                         num_workers=workers, augmentation="dermoscopy")
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[0]

    for workers in (0, 2):
        assert torch.equal(first_batch(3, workers), first_batch(3, workers)), workers
    assert not torch.equal(first_batch(3, 0), first_batch(4, 0))


def test_stratified_subset_keeps_proportions_and_every_class():
    from datamodules.splits import stratified_subset

    labels = np.array([0] * 700 + [1] * 200 + [2] * 95 + [3] * 5)  # sorted by class, as files are
    keep = stratified_subset(labels, 100, seed=0)
    assert len(keep) == 100 and len(np.unique(keep)) == 100 and (np.diff(keep) > 0).all()
    assert np.bincount(labels[keep]).tolist() == [70, 20, 9, 1]  # not the first 100 (all 0)
    assert (stratified_subset(labels, 100, seed=0) == keep).all()  # seeded
    assert not (stratified_subset(labels, 100, seed=1) == keep).all()
    assert len(stratified_subset(labels, 5000, seed=0)) == 1000
    multi = np.zeros((60, 3))
    multi[:10, 0] = multi[10:40, 1] = 1
    assert len(stratified_subset(multi, 12, seed=0)) == 12
