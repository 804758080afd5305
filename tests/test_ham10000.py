"""HAM10000 loading and the lesion-grouped split: tiny fixtures, and ../shared when present."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules import from_config
from datamodules.ham10000 import HAM10000_CLASSES, lesion_grouped_split
from tests.conftest import SHARED_HAM
from train import train


def _dm(data_dir, **kw):
    return from_config("ham10000", data_dir=None if data_dir is None else str(data_dir), image_size=16, num_workers=0,
                              batch_size=8, **kw)


def test_fixture_loads_and_splits_by_lesion(ham_dir):
    dm = _dm(ham_dir)
    frame = dm.frame
    lesions = {s: set(frame["lesion_id"].iloc[idx]) for s, idx in dm.split_idx.items()}
    assert not (lesions["train"] & lesions["val"]) and not (lesions["train"] & lesions["test"])
    assert not (lesions["val"] & lesions["test"])
    all_idx = np.concatenate(list(dm.split_idx.values()))
    assert sorted(all_idx.tolist()) == list(range(len(frame)))
    for split in ("train", "val", "test"):  # stratified: every class in every split
        assert all(v > 0 for v in dm.class_counts(split).values()), split
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long
    assert set(y.tolist()) <= set(range(7))


def test_preload_gives_same_pixels(ham_dir):
    plain, pre = _dm(ham_dir, augmentation="none"), _dm(ham_dir, augmentation="none", preload=True)
    plain.setup("fit")
    pre.setup("fit")
    for i in (0, 3, len(plain.datasets["val"]) - 1):
        a, b = plain.datasets["val"][i], pre.datasets["val"][i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _dm(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data_dir"):
        _dm(None)


def test_missing_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv"):
        _dm(tmp_path)


def test_metadata_without_columns(ham_dir):
    meta = ham_dir / "HAM10000_metadata.csv"
    pd.read_csv(meta).drop(columns=["lesion_id"]).to_csv(meta, index=False)
    with pytest.raises(ValueError, match=r"HAM10000_metadata.csv lacks the columns \['lesion_id'\]"):
        _dm(ham_dir)


def test_image_listed_but_absent(ham_dir):
    victim = next((ham_dir / "HAM10000_images_part_2").glob("*.jpg"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.stem):
        _dm(ham_dir)


def test_unknown_label(ham_dir):
    meta = ham_dir / "HAM10000_metadata.csv"
    frame = pd.read_csv(meta)
    frame.loc[0, "dx"] = "melanoma??"
    frame.to_csv(meta, index=False)
    with pytest.raises(ValueError, match="melanoma"):
        _dm(ham_dir)


def test_corrupt_image_names_file(ham_dir, caplog):
    dm = _dm(ham_dir, augmentation="none")
    dm.setup("fit")
    path = dm.datasets["train"].paths[0]
    with open(path, "wb") as fh:
        fh.write(b"not a jpeg")
    with caplog.at_level("WARNING", logger="medrobust.data"):
        assert dm.datasets["train"][0] is None  # skipped, not fatal
    assert path in caplog.text and dm.skipped_images() == [path]
    # found at start-up by a new datamodule: strict stops naming it, else it leaves the splits
    with pytest.raises(ValueError, match=r"1 unreadable image.*strict=true: HAM10000_images_part_"
                                         r"\d/" + path.split("/")[-1]):
        _dm(ham_dir, augmentation="none", strict=True)
    fresh = _dm(ham_dir, augmentation="none")
    assert fresh.skipped_images() == [path]
    assert all(path not in fresh.paths(s) for s in ("train", "val", "test"))


def test_split_function_keeps_groups_apart():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(300), rng.integers(1, 4, size=300))
    labels = groups % 3
    split = lesion_grouped_split(labels, groups, 0.15, 0.15, seed=0)
    seen = [set(groups[idx]) for idx in split.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="val_fraction"):
        lesion_grouped_split(labels, groups, 0.0, 0.15, seed=0)


def test_train_py_on_fixture(train_cfg, ham_dir):
    result = train(train_cfg("datamodule=ham10000", f"datamodule.data_dir={ham_dir}",
                             "datamodule.image_size=16", "datamodule.num_workers=0",
                             "datamodule.batch_size=8", "backbone.width=8"))
    assert 0 <= result["test"]["test/adv_bal_acc"] <= 1


@pytest.mark.skipif(not SHARED_HAM.is_dir(), reason="../shared/datasets/ham10000 not present")
def test_shared_ham10000_release():
    dm = from_config("ham10000", data_dir=str(SHARED_HAM), image_size=32, num_workers=0)
    frame = dm.frame
    assert len(frame) == 10015 and frame["lesion_id"].nunique() == 7470
    counts = frame["dx"].value_counts().to_dict()
    assert counts == {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327,
                      "vasc": 142, "df": 115}
    lesions = {s: set(frame["lesion_id"].iloc[idx]) for s, idx in dm.split_idx.items()}
    assert not (lesions["train"] & lesions["val"]) and not (lesions["train"] & lesions["test"])
    assert not (lesions["val"] & lesions["test"])
    n = {s: len(idx) for s, idx in dm.split_idx.items()}
    assert 0.10 < n["test"] / 10015 < 0.20 and 0.10 < n["val"] / 10015 < 0.20
    for split in ("val", "test"):  # class proportions roughly kept (stratified)
        frac_nv = dm.class_counts(split)["nv"] / n[split]
        assert 0.6 < frac_nv < 0.74
    dm.setup("test")
    x, y = dm.datasets["test"][0]
    assert x.shape == (3, 32, 32) and 0 <= y < len(HAM10000_CLASSES)


def test_image_listed_under_two_lesions_is_kept_once_and_links_them(ham_dir, caplog):
    meta = ham_dir / "HAM10000_metadata.csv"
    frame = pd.read_csv(meta)
    # lesion 1's image listed again under lesion 2 (same dx: the metadata's own mistake)
    img, lesion_b = frame.iloc[2]["image_id"], "HAM_0000008"  # lesion 1 is bcc, 8 is bcc
    assert frame.loc[frame["lesion_id"] == lesion_b, "dx"].iloc[0] == frame.iloc[2]["dx"]
    extra = frame.iloc[[2]].assign(lesion_id=lesion_b)
    pd.concat([frame, extra]).to_csv(meta, index=False)
    dm = _dm(ham_dir)
    assert (dm.frame["image_id"] == img).sum() == 1 and len(dm.frame) == len(frame)
    assert "listed under more than one lesion id" in caplog.text
    split_of = {s: set(dm.frame["image_id"].iloc[idx]) for s, idx in dm.split_idx.items()}
    assert sum(img in ids for ids in split_of.values()) == 1
    # the two lesions are one group now: all their images in one split
    linked = dm.frame.loc[dm.frame["lesion_id"] == dm.frame.loc[
        dm.frame["image_id"] == img, "lesion_id"].iloc[0], "image_id"]
    assert len(linked) == 2  # lesion 1's image and lesion 8's (one image each)
    assert sum(bool(set(linked) & ids) for ids in split_of.values()) == 1
    # the same image with two different diagnoses is one line naming it
    pd.concat([frame, frame.iloc[[2]].assign(lesion_id="HAM_0000009", dx="mel")]).to_csv(
        meta, index=False)
    with pytest.raises(ValueError, match=f"image {img} is listed 2 times with different dx"):
        _dm(ham_dir)
