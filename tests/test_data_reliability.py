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
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules import from_config
from lightning_modules.core.errors import ConfigError
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


def test_damage_met_while_loading_skipped_or_one_line_when_strict(tmp_path, caplog):
    """Without preload or cache, damage inside the pixel data is met in the loader."""
    root = layouts.write_folder(tmp_path / "d", splits=True)
    victim = root / "val" / "benign" / "img_000.png"
    damage_png_data(victim)
    lenient = from_config("folder", data_dir=str(root), **LOADER)
    lenient.setup()
    with caplog.at_level("WARNING", logger="medrobust.data"):
        assert sum(len(y) for _, y in lenient.val_dataloader()) == 8
        lenient.teardown()
    assert lenient.skipped_images() == [str(victim)]
    assert "skipped 1 unreadable image(s) (strict=false): val/benign/img_000.png" in caplog.text
    strict = from_config("folder", data_dir=str(root), strict=True, **LOADER)
    strict.setup()
    with pytest.raises(ConfigError, match=r"^cannot read image .*img_000.png: broken data "
                                          r"stream.* \(datamodule.strict=true;") as err:
        list(strict.val_dataloader())
    assert "\n" not in str(err.value)


def test_strict_damage_met_in_a_worker_process_is_one_line(train_cfg, tmp_path, capsys):
    """A worker's exception would carry its traceback; the main process raises instead."""
    import logging

    from lightning_modules.core.errors import exit_on_config_error

    root = layouts.write_folder(tmp_path / "d", splits=True)
    damage_png_data(root / "val" / "benign" / "img_000.png")
    cfg = train_cfg("datamodule=folder", f"datamodule.data_dir={root}", "datamodule.strict=true",
                    "datamodule.num_workers=1", "trainer.limit_train_batches=1")
    with pytest.raises(SystemExit) as stop, exit_on_config_error(logging.getLogger("t")):
        train(cfg)
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("medrobust")]
    assert "Traceback" not in stderr and "Caught" not in stderr
    assert err == ["medrobust: error: 1 unreadable image(s) and datamodule.strict=true: "
                   "val/benign/img_000.png (first: broken data stream when reading image file); "
                   "replace or remove them, or set datamodule.strict=false to skip them"]


@pytest.mark.parametrize("mode", ["preload", "cache"])
def test_metrics_json_lists_skipped_images_with_preload_and_cache(train_cfg, tmp_path, mode):
    """One file found at start-up (truncated), one only by decoding (damaged pixel data)."""
    root = layouts.write_folder(tmp_path / "d", splits=True)
    cut, damaged = root / "train" / "benign" / "img_005.png", root / "test" / "normal" / "img_001.png"
    layouts.corrupt(cut)
    damage_png_data(damaged)
    extra = "datamodule.preload=true" if mode == "preload" else \
        f"datamodule.cache_dir={tmp_path / 'cache'}"
    result = train(train_cfg("datamodule=folder", f"datamodule.data_dir={root}",
                             "datamodule.num_workers=0", "train=false", extra))
    assert result["skipped_images"] == sorted([str(cut), str(damaged)])
    saved = json.loads((Path(result["output_dir"]) / "metrics.json").read_text())
    assert saved["skipped_images"] == result["skipped_images"]


def test_train_strict_with_a_bad_image_is_one_line_before_training(train_cfg, tmp_path, capsys):
    """As train.py's main runs it: one ``medrobust: error:`` line, exit code 2, no checkpoint."""
    import logging

    from lightning_modules.core.errors import exit_on_config_error

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
def _assert_no_file_in_two_splits(dm, groups: bool = True) -> None:
    files = {s: [os.path.realpath(p) for p in dm.paths(s)] for s in SPLITS}
    for split, paths in files.items():
        assert len(set(paths)) == len(paths), f"a file twice in {split}"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(files[a]) & set(files[b]), f"a file in {a} and {b}"
    if groups and dm.table.groups is not None:
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


# ------------------------------------------------------------------ property-based (hypothesis)
FUZZ = settings(max_examples=int(os.environ.get("MEDROBUST_FUZZ_EXAMPLES", "30")), deadline=None,
                derandomize="MEDROBUST_FUZZ_EXAMPLES" not in os.environ, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
ONE_LINE_ERRORS = (ValueError, OSError, ConfigError)


def _good_bytes() -> dict[str, bytes]:
    import io

    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 255, (18, 24, 3), dtype=np.uint8)
    out = {}
    for fmt in ("PNG", "JPEG", "TIFF", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


GOOD = _good_bytes()


@st.composite
def damaged_image(draw) -> bytes:
    """A valid PNG/JPEG/TIFF/BMP cut short, with bytes overwritten or inserted, or pure noise."""
    data = bytearray(GOOD[draw(st.sampled_from(sorted(GOOD)))])
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "noise"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "noise":
        return draw(st.binary(max_size=600))
    at = draw(st.integers(0, len(data) - 1))
    chunk = draw(st.binary(min_size=1, max_size=16))
    if kind == "overwrite":
        data[at:at + len(chunk)] = chunk
    else:
        data[at:at] = chunk
    return bytes(data)


def _assert_one_line_naming(err: BaseException, *names: str) -> None:
    text = str(err)
    assert isinstance(err, ONE_LINE_ERRORS), f"{type(err).__name__}: {text}"
    assert "\n" not in text and any(n in text for n in names), text


def test_fuzz_damaged_images_are_skipped_and_counted_or_one_line(tmp_path):
    from datamodules.decode import decode_image

    root = layouts.write_folder(tmp_path / "d", splits=True)
    victims = [root / "train" / "benign" / "img_001.png", root / "val" / "normal" / "img_000.png",
               root / "test" / "malignant" / "img_002.png"]
    originals = {v: v.read_bytes() for v in victims}

    @FUZZ
    @given(images=st.lists(damaged_image(), min_size=1, max_size=3),
           mode=st.sampled_from(["decode", "preload", "cache"]), strict=st.booleans())
    def run(images, mode, strict):
        hit = victims[: len(images)]
        for victim, data in zip(hit, images, strict=False):
            victim.write_bytes(data)
        extra = {"decode": {}, "preload": {"preload": True},
                 "cache": {"cache_dir": str(tmp_path / "cache")}}[mode]
        try:
            dm = from_config("folder", data_dir=str(root), strict=strict, **LOADER, **extra)
            dm.prepare_data()
            dm.setup()
            for split in SPLITS:  # every image, in order (the training loader drops some)
                for x, y in dm._loader(split, shuffle=False):
                    assert x.shape[1:] == (3, 16, 16) and 0 <= int(y.min()) <= int(y.max()) < 3
        except ONE_LINE_ERRORS as err:
            assert strict, f"not strict, yet {type(err).__name__}: {err}"
            _assert_one_line_naming(err, *(v.name for v in hit))
            return
        finally:
            for victim in hit:
                victim.write_bytes(originals[victim])
        skipped = set(dm.skipped_images())
        assert skipped <= {str(v) for v in hit}
        for victim in hit:  # every damaged file is either listed as skipped or was decoded
            assert str(victim) in skipped or _decodes(decode_image, victim, images[hit.index(victim)])

    run()


def _decodes(decode_image, path: Path, data: bytes) -> bool:
    saved = path.read_bytes()
    path.write_bytes(data)
    try:
        decode_image(str(path), 16, 3)
        return True
    except OSError:
        return False
    finally:
        path.write_bytes(saved)


CELLS = st.one_of(st.sampled_from(["benign", "malignant", "normal", "", " ", "train", "val",
                                   "test", "0", "1", "imgs/case_000.jpg", "imgs/case_001.jpg",
                                   "imgs/none.jpg", "../x.jpg", '"', ",", "NaN", "None"]),
                  st.text(max_size=8))
COLUMNS = st.sampled_from(["path", "diagnosis", "patient_id", "split", "extra", "Path",
                           " diagnosis ", "", "path"])


@st.composite
def csv_bytes(draw) -> bytes:
    """A labels.csv: usually the right columns with a few cells replaced by odd values; some
    columns missing, extra, misnamed or repeated; LF or CRLF; UTF-8, BOM, Latin-1 or UTF-16."""
    columns = ["path", "diagnosis", "patient_id", "split"]
    if draw(st.booleans()):
        columns = draw(st.lists(COLUMNS, min_size=1, max_size=5))
    rows = []
    for k in range(draw(st.integers(0, 40))):
        good = {"path": f"imgs/case_{k:03d}.jpg", "diagnosis": ["benign", "malignant",
                "normal"][k % 3], "patient_id": f"P{k // 2}",
                "split": ["train", "train", "train", "val", "test"][k % 5]}
        row = [good.get(c.strip(), "x") for c in columns]
        if draw(st.integers(0, 4)) == 0:
            row[draw(st.integers(0, len(row) - 1))] = draw(CELLS)
        rows.append(row)
    buf = pd.DataFrame(rows, columns=columns).to_csv(index=False,
                                                     lineterminator=draw(st.sampled_from(
                                                         ["\n", "\r\n"])))
    return buf.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])),
                      errors="replace")


def test_fuzz_csv_loads_or_one_line_error(tmp_path):
    root = layouts.write_csv_dataset(tmp_path / "c", n=40)
    csv = root / "labels.csv"

    @FUZZ
    @given(data=csv_bytes(), use_split=st.booleans(), classes=st.sampled_from(
        [None, ["benign", "malignant", "normal"]]))
    def run(data, use_split, classes):
        csv.write_bytes(data)
        try:
            dm = from_config("csv", data_dir=str(root), csv_file="labels.csv", path_column="path",
                             label_column="diagnosis", group_column="patient_id",
                             split_column="split" if use_split else None, classes=classes,
                             val_fraction=0.2, test_fraction=0.2, **LOADER)
        except ONE_LINE_ERRORS as err:
            _assert_one_line_naming(err, "labels.csv", "datamodule.", str(root))
            return
        targets = np.asarray(dm.table.targets)
        assert targets.min() >= 0 and targets.max() < dm.num_classes
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding_errors="replace")
        labels = dict(zip(frame["path"].str.strip(), frame["diagnosis"].str.strip(), strict=False))
        for path, t in zip(dm.table.paths, targets, strict=True):  # never a wrong label
            assert dm.class_names[int(t)] == labels[os.path.relpath(path, root)]
        _assert_no_file_in_two_splits(dm, groups=not use_split)  # a split column may share

    run()


def test_patient_in_two_fixed_splits_is_a_warning_with_count(tmp_path, caplog):
    root = layouts.write_csv_dataset(tmp_path / "c")
    frame = pd.read_csv(root / "labels.csv")
    frame["split"] = ["train"] * 31 + ["val"] * 5 + ["test"] * 4  # P015 in train and val
    with caplog.at_level("WARNING", logger="medrobust.data"):
        _csv(root, frame, split_column="split")
    assert "1 patient/lesion group(s) are in more than one split as the data fixes them " \
           "(e.g. P015 in train and val)" in caplog.text


ODD_ARRAYS = [  # what a damaged or foreign .npz may hold instead of an array
    lambda a: a[:-1], lambda a: a[:0], lambda a: a.astype(np.float32) + 0.5,
    lambda a: a.astype(np.int16) - 1, lambda a: a.astype(np.int64) + 9,
    lambda a: a.reshape(len(a), -1)[:, :1], lambda a: np.array(["a", "b"]),
    lambda a: np.zeros((len(a), 2), np.uint8), lambda a: a[..., None]]


@st.composite
def medmnist_arrays(draw) -> dict[str, np.ndarray]:
    """The six arrays of a pathmnist file, some with an odd shape, dtype, length or value."""
    arrays = {}
    for split, n in zip(SPLITS, (12, 4, 4), strict=True):
        arrays[f"{split}_images"] = np.full((n, 28, 28, 3), 7, np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 9).reshape(-1, 1).astype(np.uint8)
    for key in draw(st.lists(st.sampled_from(sorted(arrays)), max_size=2, unique=True)):
        arrays[key] = draw(st.sampled_from(ODD_ARRAYS))(arrays[key])
    if draw(st.booleans()):
        arrays.pop(draw(st.sampled_from(sorted(arrays))))
    return arrays


def test_fuzz_medmnist_file_loads_or_one_line_error(tmp_path):
    import io

    path = tmp_path / "pathmnist.npz"

    @FUZZ
    @given(arrays=medmnist_arrays(), damage=st.sampled_from(["none", "truncate", "overwrite"]),
           at=st.floats(0, 1), chunk=st.binary(min_size=1, max_size=32))
    def run(arrays, damage, at, chunk):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = bytearray(buf.getvalue())
        cut = int(at * (len(data) - 1))
        if damage == "truncate":
            data = data[:cut]
        elif damage == "overwrite":
            data[cut:cut + len(chunk)] = chunk
        path.write_bytes(bytes(data))
        try:
            dm = from_config("medmnist", flag="pathmnist", data_dir=str(tmp_path), size=28,
                             download=False, image_size=16, num_workers=0, batch_size=8)
        except ValueError as err:
            _assert_one_line_naming(err, str(path))
            return
        dm.setup()
        for split in SPLITS:
            labels = dm.targets(split)
            assert labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < 9
            assert len(dm.datasets[split]) == len(labels) == len(arrays[f"{split}_images"])
            for x, y in dm._loader(split, shuffle=False):
                assert x.shape[1:] == (3, 16, 16) and y.dtype == torch.long

    run()


def test_isic_one_hot_cell_other_than_0_or_1_is_an_error(tmp_path):
    root = layouts.write_isic2018(tmp_path / "isic")
    gt = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    frame = pd.read_csv(gt)
    frame.loc[3, "MEL"] = 0.7
    frame.to_csv(gt, index=False)
    with pytest.raises(ValueError, match="class columns must hold 0 or 1; row 3 column 'MEL' "
                                         "is '0.7'"):
        from_config("isic2018", data_dir=str(root), **LOADER)


def test_medmnist_identical_images_in_two_official_splits_are_counted(tmp_path, caplog):
    path = layouts.write_medmnist(tmp_path, "pathmnist")
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["test_images"][:3] = arrays["train_images"][5:8]
    np.savez(path, **arrays)
    with caplog.at_level("WARNING", logger="medrobust.data"):
        dm = from_config("medmnist", flag="pathmnist", data_dir=str(tmp_path), size=28,
                         download=False, num_workers=0)
    assert "pixel-identical images in two official splits (3 train/test)" in caplog.text
    assert len(dm.targets("test")) == 12  # kept as published


def test_folder_with_one_class_names_the_folder_to_use(train_cfg, tmp_path, capsys):
    """data_dir one level too high (the Kermany release's chest_xray/ inside): one line that
    names the folder to point at, not a num_classes error from deep inside."""
    import logging

    from lightning_modules.core.errors import exit_on_config_error

    root = layouts.write_pneumonia(tmp_path / "kermany").parent  # the release's top folder
    cfg = train_cfg("datamodule=folder", f"datamodule.data_dir={root}", "datamodule.num_classes=2")
    with pytest.raises(SystemExit) as stop, exit_on_config_error(logging.getLogger("t")):
        train(cfg)
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("medrobust")]
    assert len(err) == 1 and "one class sub-folder ['chest_xray']" in err[0], err
    assert f"point datamodule.data_dir at {root / 'chest_xray'}" in err[0]
