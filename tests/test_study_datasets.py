"""The second study's datasets in their published layouts: ISIC 2016 Part 3 (headerless CRLF
CSVs, text and 0/1 labels) and Messidor (per-base .xls/.xlsx annotations); the real ISIC 2016
subset in ../shared when present."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules import from_config
from tests import layouts
from tests.conftest import ROOT

LOADER = {"image_size": 16, "num_workers": 0, "batch_size": 8}
SHARED_ISIC2016 = ROOT.parent / "shared" / "datasets" / "isic2016"


def _disjoint(groups, split_idx) -> bool:
    sets = [set(groups[v]) for v in split_idx.values()]
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])


# --------------------------------------------------------------------------------- ISIC 2016
def test_isic2016_official_test_set_and_both_label_spellings(tmp_path):
    root = layouts.write_isic2016(tmp_path / "isic2016", n_train=40, n_test=12)
    dm = from_config("isic2016", data_dir=str(root), **LOADER)
    assert dm.class_names == ["benign", "malignant"] and dm.num_classes == 2
    sizes = {k: len(v) for k, v in dm.split_idx.items()}
    assert sizes["test"] == 12 and sizes["train"] + sizes["val"] == 40 and sizes["val"] >= 4
    # labels: row k is malignant iff k % 3 == 0, in both files (text in one, 0.0/1.0 in the other)
    test_paths = dm.paths("test")
    assert all("Test_Data" in p for p in test_paths)
    assert dm.targets("test").tolist() == [int(k % 3 == 0) for k in range(12)]
    train_rows = np.concatenate([dm.split_idx["train"], dm.split_idx["val"]])
    assert dm.table.targets[train_rows].sum() == sum(k % 3 == 0 for k in range(40))
    dm.setup()
    x, y = dm.datasets["test"][0]
    assert tuple(x.shape) == (3, 16, 16) and int(y) == 1


def test_isic2016_header_row_tolerated_bad_label_and_missing_image_named(tmp_path):
    root = layouts.write_isic2016(tmp_path / "isic2016", n_train=40, n_test=12)
    gt = root / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv"
    original = gt.read_bytes()
    gt.write_bytes(b"image_id,label\r\n" + original)  # a copy with a header
    assert len(from_config("isic2016", data_dir=str(root), **LOADER).table.paths) == 52
    gt.write_bytes(original.replace(b"ISIC_0000001,benign", b"ISIC_0000001,benihn"))
    with pytest.raises(ValueError, match=r"Training_GroundTruth.csv.*'ISIC_0000001', 'benihn'"):
        from_config("isic2016", data_dir=str(root), **LOADER)
    gt.write_bytes(original + b"ISIC_0000041,benign\r\n")  # also in the test file
    with pytest.raises(ValueError, match=r"1 image id\(s\) listed twice .*ISIC_0000041"):
        from_config("isic2016", data_dir=str(root), **LOADER)
    gt.write_bytes(original)
    (root / "ISBI2016_ISIC_Part3_Test_Data" / "ISIC_0000041.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*Test_GroundTruth.csv"):
        from_config("isic2016", data_dir=str(root), **LOADER)
    with pytest.raises(FileNotFoundError, match="Training_GroundTruth.csv not found"):
        from_config("isic2016", data_dir=str(root / "ISBI2016_ISIC_Part3_Test_Data"), **LOADER)


@pytest.mark.skipif(not SHARED_ISIC2016.is_dir(), reason="../shared/datasets/isic2016 absent")
def test_isic2016_real_subset_counts():
    dm = from_config("isic2016", data_dir=str(SHARED_ISIC2016), **LOADER)
    train_rows = np.concatenate([dm.split_idx["train"], dm.split_idx["val"]])
    # the shared README's counts: 353 training (83 malignant), 131 test (35 malignant)
    assert len(train_rows) == 353 and dm.table.targets[train_rows].sum() == 83
    assert len(dm.split_idx["test"]) == 131 and dm.targets("test").sum() == 35
    # stratified validation: the malignant share within a few points of training's
    share = dm.targets("val").mean()
    assert abs(share - 83 / 353) < 0.05


# ---------------------------------------------------------------------------------- Messidor
def test_messidor_xls_and_xlsx_grade_and_referable_grouped_by_base(tmp_path):
    root = layouts.write_messidor(tmp_path / "messidor", per_base=8, xlsx_bases=1)
    dm = from_config("messidor", data_dir=str(root), **LOADER)
    assert dm.num_classes == 4 and len(dm.table.paths) == 8 * len(layouts.MESSIDOR_BASES)
    assert sorted(set(dm.table.groups)) == sorted(layouts.MESSIDOR_BASES)  # .xls and .xlsx read
    assert _disjoint(dm.table.groups, dm.split_idx)
    assert np.bincount(dm.table.targets).tolist() == [16] * 4  # grade = k % 4 per base
    ref = from_config("messidor", data_dir=str(root), target="referable", **LOADER)
    assert ref.num_classes == 2 and ref.class_names[1].startswith("referable")
    assert (ref.table.targets == (dm.table.targets >= 2)).all()
    ref.setup()
    x, _ = ref.datasets["train"][0]
    assert tuple(x.shape) == (3, 16, 16)


def test_messidor_bad_input_one_line(tmp_path):
    import pandas as pd

    root = layouts.write_messidor(tmp_path / "messidor", per_base=8, xlsx_bases=1)
    with pytest.raises(ValueError, match="datamodule.target='dr'"):
        from_config("messidor", data_dir=str(root), target="dr", **LOADER)
    sheet = root / "Base32" / "Annotation_Base32.xlsx"
    frame = pd.read_excel(sheet)
    frame.loc[2, "Retinopathy grade"] = 7
    frame.to_excel(sheet, index=False)
    with pytest.raises(ValueError, match=r"Annotation_Base32.xlsx: 1 row\(s\) whose 'Retinopathy "
                                         r"grade' is not 0-3"):
        from_config("messidor", data_dir=str(root), **LOADER)
    frame.loc[2, "Retinopathy grade"] = 2
    frame.rename(columns={"Image name": "Image"}).to_excel(sheet, index=False)
    with pytest.raises(ValueError, match=r"Annotation_Base32.xlsx lacks the columns \['Image name'\]"):
        from_config("messidor", data_dir=str(root), **LOADER)
    frame.to_excel(sheet, index=False)
    next((root / "Base11").glob("*.tif")).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*Annotation_Base11.xls"):
        from_config("messidor", data_dir=str(root), **LOADER)
    with pytest.raises(FileNotFoundError, match="no Annotation_"):
        from_config("messidor", data_dir=str(layouts.write_folder(tmp_path / "f")), **LOADER)
