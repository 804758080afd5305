"""Data reliability: unreadable images found at start-up (strict stops with one line, else they
are skipped and counted with preload and cache too), a cache built leniently does not fool a
strict run, no file in two splits for any datamodule, and files listed twice."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules import from_config
from lightning_modules.utils import ConfigError
from tests import layouts
from tests.conftest import write_ham_fixture
from train import train

LOADER = {"image_size": 16, "num_workers": 0, "batch_size": 8}
SPLITS = ("train", "val", "test")


def damage_png_data(path: Path) -> None:
    """Zero a PNG's compressed pixel data but keep every checksum and the ``IEND`` end: the
    start-up check passes it and only decoding fails (damage a header check cannot see)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"IDAT") - 4
    n = struct.unpack(">I", data[at:at + 4])[0]
    body = bytes(data[at + 8:at + 10]) + bytes(n - 2)  # zlib header kept, stream zeroed
    data[at + 8:at + 8 + n] = body
    data[at + 8 + n:at + 12 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ unreadable images, strict
def test_damage_inside_the_data_passes_the_check_and_fails_decoding(tmp_path):
    from datamodules.decode import check_image, decode_image

    root = layouts.write_folder(tmp_path / "d", per_class=2)
    victim = root / "benign" / "img_000.png"
    damage_png_data(victim)
    check_image(str(victim), 16, 3)
    with pytest.raises(OSError, match="img_000.png"):
        decode_image(str(victim), 16, 3)


@pytest.mark.parametrize("fmt", ["jpg", "png", "tif", "bmp"])
def test_start_up_check_finds_truncated_and_junk_files(tmp_path, fmt):
    from PIL import Image

    from datamodules.decode import find_unreadable

    pixels = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    good = tmp_path / f"good.{fmt}"
    Image.fromarray(pixels).save(good)
    data = good.read_bytes()
    files = {"good": good}
    for name, payload in (("third", data[: len(data) // 3]), ("most", data[: len(data) * 9 // 10]),
                          ("junk", b"not an image"), ("empty", b"")):
        files[name] = tmp_path / f"{name}.{fmt}"
        files[name].write_bytes(payload)
    bad = find_unreadable([str(p) for p in files.values()], 16, 3)
    assert sorted(bad) == sorted(str(p) for k, p in files.items() if k != "good")
    assert all(str(tmp_path) not in why for why in bad.values())  # the path is said once


def test_cache_built_lenient_then_strict_stops_naming_the_file(tmp_path, caplog):
    root = layouts.write_folder(tmp_path / "d", splits=True)
    victim = root / "train" / "benign" / "img_003.png"
    damage_png_data(victim)
    cache = str(tmp_path / "cache")
    with caplog.at_level("WARNING", logger="medrobust.data"):
        lenient = from_config("folder", data_dir=str(root), cache_dir=cache, **LOADER)
        lenient.prepare_data()
        lenient.setup("fit")
    assert lenient.skipped_images() == [str(victim)]
    assert len(lenient.datasets["train"]) == 41
    assert "skipped 1 unreadable image(s) (strict=false): train/benign/img_003.png" in caplog.text
    meta = json.loads(next(Path(cache).glob("folder-train-*.json")).read_text())
    assert meta["bad_paths"] == [str(victim)] and "broken data stream" in meta["bad_reasons"][0]
    # the same cache, strict: stops before training (prepare_data, or setup on other ranks)
    strict = from_config("folder", data_dir=str(root), cache_dir=cache, strict=True, **LOADER)
    mtimes = sorted(f.stat().st_mtime_ns for f in Path(cache).glob("*.npy"))
    for step in (strict.prepare_data, strict.setup):
        with pytest.raises(ConfigError, match=r"^1 unreadable image\(s\) and datamodule.strict="
                                              r"true: train/benign/img_003.png \(first: broken"):
            step()
    assert sorted(f.stat().st_mtime_ns for f in Path(cache).glob("*.npy")) == mtimes  # reused


def test_preload_counts_and_strict(tmp_path, caplog):
    root = layouts.write_folder(tmp_path / "d", splits=True)
    victims = [root / "train" / "normal" / "img_001.png", root / "test" / "benign" / "img_002.png"]
    for v in victims:
        damage_png_data(v)
    with caplog.at_level("WARNING", logger="medrobust.data"):
        dm = from_config("folder", data_dir=str(root), preload=True, **LOADER)
        dm.setup()
    assert dm.skipped_images() == sorted(map(str, victims))
    assert caplog.text.count("unreadable") == 1  # one summary line
    assert "skipped 2 unreadable image(s) (strict=false): test/benign/img_002.png, " \
           "train/normal/img_001.png" in caplog.text
    assert len(dm.datasets["train"]) == 41 and len(dm.datasets["test"]) == 8
    strict = from_config("folder", data_dir=str(root), preload=True, strict=True, **LOADER)
    with pytest.raises(ConfigError, match="2 unreadable image.*strict=true: test/benign/img_002"):
        strict.setup()


def _ham_run(train_cfg, ham_dir, *extra):
    return train(train_cfg("datamodule=ham10000", f"datamodule.data_dir={ham_dir}",
                           "datamodule.image_size=16", "datamodule.num_workers=0",
                           "datamodule.batch_size=8", "trainer.limit_train_batches=1",
                           "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                           *extra))


@pytest.mark.parametrize("mode", ["preload", "cache"])
def test_metrics_json_lists_skipped_images_with_preload_and_cache(train_cfg, tmp_path, mode):
    ham = write_ham_fixture(tmp_path / "ham")
    files = sorted(ham.glob("HAM10000_images_part_*/*.jpg"))
    layouts.corrupt(files[3])
    (files[10]).write_bytes(b"")
    extra = ["datamodule.preload=true"] if mode == "preload" else \
        [f"datamodule.cache_dir={tmp_path / 'cache'}"]
    result = _ham_run(train_cfg, ham, *extra)
    assert result["skipped_images"] == sorted([str(files[3]), str(files[10])])
    saved = json.loads((Path(result["output_dir"]) / "metrics.json").read_text())
    assert saved["skipped_images"] == result["skipped_images"]


def test_train_strict_with_a_bad_image_is_one_line_before_training(train_cfg, tmp_path, capsys):
    """As train.py's main runs it: one ``medrobust: error:`` line, exit code 2, no checkpoint."""
    import logging

    from lightning_modules.utils import exit_on_config_error

    root = layouts.write_folder(tmp_path / "d")
    layouts.corrupt(root / "malignant" / "img_002.png")
    cfg = train_cfg("datamodule=folder", f"datamodule.data_dir={root}", "datamodule.strict=true",
                    "datamodule.num_workers=0")
    with pytest.raises(SystemExit) as stop, exit_on_config_error(logging.getLogger("t")):
        train(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medrobust: error: datamodule: ValueError: 1 "
                                               "unreadable image(s) and datamodule.strict=true: "
                                               "malignant/img_002.png (first: ")
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


# --------------------------------------------------------------------- no file in two splits
def _assert_no_file_in_two_splits(dm) -> None:
    files = {s: [os.path.realpath(p) for p in dm.paths(s)] for s in SPLITS}
    for split, paths in files.items():
        assert len(set(paths)) == len(paths), f"a file twice in {split}"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(files[a]) & set(files[b]), f"a file in {a} and {b}"
    if dm.table.groups is not None:
        groups = {s: set(np.asarray(dm.table.groups)[dm.split_idx[s]].tolist()) for s in SPLITS}
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                assert not groups[a] & groups[b], f"a patient/lesion in {a} and {b}"
    dm.setup()
    for s in SPLITS:  # what the loaders read is what the split lists
        assert sorted(os.path.realpath(p) for p in dm.datasets[s].paths) == sorted(files[s])


def _assert_no_image_in_two_splits(dm) -> None:
    """Array datamodules (no files): no identical image in two splits."""
    dm.setup()
    seen: dict[str, str] = {}
    for s in SPLITS:
        ds = dm.datasets[s]
        for i in range(len(ds)):
            key = hashlib.sha1(ds[i][0].numpy().tobytes()).hexdigest()
            assert seen.setdefault(key, s) == s, f"one image in {seen[key]} and {s}"


FILE_DATASETS = {
    "folder": lambda p: ({"data_dir": str(layouts.write_folder(p, per_class=10))}),
    "folder_splits": lambda p: ({"data_dir": str(layouts.write_folder(p, splits=True))}),
    "csv": lambda p: ({"data_dir": str(layouts.write_csv_dataset(p)), "csv_file": "labels.csv",
                       "path_column": "path", "label_column": "diagnosis",
                       "group_column": "patient_id"}),
    "ham10000": lambda p: ({"data_dir": str(write_ham_fixture(p))}),
    "isic2016": lambda p: ({"data_dir": str(layouts.write_isic2016(p))}),
    "isic2018": lambda p: ({"data_dir": str(layouts.write_isic2018(p, n_train=84, n_test=0)),
                            "test_fraction": 0.25}),
    "isic2019": lambda p: ({"data_dir": str(layouts.write_isic2019(p)), "val_fraction": 0.25,
                            "test_fraction": 0.25}),
    "messidor": lambda p: ({"data_dir": str(layouts.write_messidor(p))}),
    "chestxray14": lambda p: ({"data_dir": str(layouts.write_chestxray14(p)),
                               "val_fraction": 0.2}),
}


@pytest.mark.parametrize("name", sorted(FILE_DATASETS))
def test_no_file_in_two_splits(tmp_path, name):
    options = FILE_DATASETS[name](tmp_path / name)
    module = name.split("_")[0] if name.startswith("folder") else name
    _assert_no_file_in_two_splits(from_config(module, **LOADER, **options))


def test_no_image_in_two_splits_synthetic_and_medmnist(tmp_path):
    _assert_no_image_in_two_splits(from_config("synthetic", n_train=48, n_val=16, n_test=16,
                                               **LOADER))
    layouts.write_medmnist(tmp_path / "mm", "pathmnist")
    _assert_no_image_in_two_splits(from_config("medmnist", flag="pathmnist",
                                               data_dir=str(tmp_path / "mm"), size=28,
                                               num_workers=0, batch_size=8))


# --------------------------------------------------------------------------- files listed twice
def _csv(root: Path, frame: pd.DataFrame, **kw):
    frame.to_csv(root / "labels.csv", index=False)
    return from_config("csv", data_dir=str(root), csv_file="labels.csv", path_column="path",
                       label_column="diagnosis", group_column="patient_id", **LOADER, **kw)


def test_csv_row_listed_twice_is_kept_once_and_links_its_patients(tmp_path, caplog):
    root = layouts.write_csv_dataset(tmp_path / "c", n=60)
    frame = pd.read_csv(root / "labels.csv")
    twice = frame.iloc[[0, 7]].assign(patient_id=["P900", "P901"])  # same files, other patients
    with caplog.at_level("WARNING", logger="medrobust.data"):
        dm = _csv(root, pd.concat([frame, twice], ignore_index=True))
    assert len(dm.table.paths) == 60
    assert "2 file(s) listed more than once (2 extra row(s), e.g. " in caplog.text
    groups = np.asarray(dm.table.groups)
    assert groups[0] == groups[1]  # P000 (rows 0, 1) and P900 are one group now
    _assert_no_file_in_two_splits(dm)


def test_csv_row_listed_twice_with_another_label_or_split_is_an_error(tmp_path):
    root = layouts.write_csv_dataset(tmp_path / "c")
    frame = pd.read_csv(root / "labels.csv")
    other = frame.iloc[[4]].assign(diagnosis="normal" if frame.diagnosis[4] != "normal" else "benign")
    with pytest.raises(ValueError, match=r"labels.csv: .*case_004.jpg is listed twice with "
                                         r"different labels"):
        _csv(root, pd.concat([frame, other], ignore_index=True))
    frame["split"] = ["train"] * 30 + ["val"] * 5 + ["test"] * 5
    moved = frame.iloc[[2]].assign(split="test")
    with pytest.raises(ValueError, match="case_002.jpg is listed for both the train and the "
                                         "test split"):
        _csv(root, pd.concat([frame, moved], ignore_index=True), split_column="split")


def test_folder_link_to_a_file_counts_as_that_file(tmp_path):
    root = layouts.write_folder(tmp_path / "f", per_class=10)
    (root / "benign" / "copy_of_0.png").symlink_to(root / "benign" / "img_000.png")
    dm = from_config("folder", data_dir=str(root), **LOADER)
    assert len(dm.table.paths) == 30
    _assert_no_file_in_two_splits(dm)
    (root / "malignant" / "also_0.png").symlink_to(root / "benign" / "img_000.png")
    with pytest.raises(ValueError, match="also_0.png is listed twice with different labels "
                                         r"\(benign and malignant\)"):
        from_config("folder", data_dir=str(root), **LOADER)


def test_chestxray14_row_listed_twice_is_kept_once(tmp_path):
    root = layouts.write_chestxray14(tmp_path / "cxr")
    entries = pd.read_csv(root / "Data_Entry_2017.csv")
    pd.concat([entries, entries.iloc[[5]]]).to_csv(root / "Data_Entry_2017.csv", index=False)
    dm = from_config("chestxray14", data_dir=str(root), val_fraction=0.2, **LOADER)
    assert len(dm.table.paths) == len(entries)
    _assert_no_file_in_two_splits(dm)


def test_isic_image_in_two_ground_truths_is_an_error(tmp_path):
    root = layouts.write_isic2018(tmp_path / "isic", n_test=14)
    gt = root / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv"
    train_gt = pd.read_csv(root / "ISIC2018_Task3_Training_GroundTruth"
                           / "ISIC2018_Task3_Training_GroundTruth.csv")
    pd.concat([pd.read_csv(gt), train_gt.iloc[[0]]]).to_csv(gt, index=False)
    with pytest.raises(ValueError, match="1 image id.*listed twice.*ISIC_0024306"):
        from_config("isic2018", data_dir=str(root), **LOADER)
