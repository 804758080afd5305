"""Tiny datasets in the exact published layouts (real file names and CSV headers), made by tests.

Images carry a little class signal (mean brightness per class) so a few training steps are
meaningful, but the point is the layout: folders, names, headers, split files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ISIC2018_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def _image(rng, label: int, size=(24, 18), gray=False) -> Image.Image:
    base = 40 + 25 * label
    if gray:
        return Image.fromarray(rng.integers(base, base + 30, size=size[::-1], dtype=np.uint8), "L")
    return Image.fromarray(rng.integers(base, base + 30, size=(*size[::-1], 3), dtype=np.uint8))


def _one_hot_frame(ids, labels, classes) -> pd.DataFrame:
    frame = pd.DataFrame({"image": ids})
    for i, c in enumerate(classes):
        frame[c] = [1.0 if lab == i else 0.0 for lab in labels]
    return frame


def write_isic2018(root: Path, n_train: int = 42, n_val: int = 14, n_test: int = 0,
                   seed: int = 0) -> Path:
    """ISIC2018_Task3_* folders and ground truth (+ lesion groupings); test only if n_test."""
    rng = np.random.default_rng(seed)
    counter = iter(range(24306, 10**7))
    lesion_rows = []
    for split, n in (("Training", n_train), ("Validation", n_val), ("Test", n_test)):
        if n == 0:
            continue
        img_dir = root / f"ISIC2018_Task3_{split}_Input"
        gt_dir = root / f"ISIC2018_Task3_{split}_GroundTruth"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        ids, labels = [], []
        for k in range(n):
            label = k % 7
            image_id = f"ISIC_{next(counter):07d}"
            _image(rng, label).save(img_dir / f"{image_id}.jpg")
            ids.append(image_id)
            labels.append(label)
            if split == "Training":  # two images per lesion
                lesion_rows.append({"image": image_id, "lesion_id": f"HAM_{k // 2:07d}",
                                    "diagnosis_confirm_type": "histopathology"})
        _one_hot_frame(ids, labels, ISIC2018_CLASSES).to_csv(
            gt_dir / f"ISIC2018_Task3_{split}_GroundTruth.csv", index=False)
    # pair images of the same class into a lesion (grouping is by lesion, labels agree)
    frame = pd.DataFrame(lesion_rows)
    frame["lesion_id"] = [f"HAM_{(i % 7) + 7 * (i // 14):07d}" for i in range(len(frame))]
    frame.to_csv(root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    return root


def write_isic2019(root: Path, n_train: int = 64, seed: int = 0) -> Path:
    """ISIC_2019_Training_Input + ground truth + metadata (lesion_id, some blank); no test."""
    rng = np.random.default_rng(seed)
    img_dir = root / "ISIC_2019_Training_Input"
    img_dir.mkdir(parents=True)
    ids, labels, lesions = [], [], []
    for k in range(n_train):
        label = k % 8  # UNK never appears in training, as in the release
        image_id = f"ISIC_{k:07d}"
        _image(rng, label).save(img_dir / f"{image_id}.jpg")
        ids.append(image_id)
        labels.append(label)
        lesions.append("" if k % 5 == 0 else f"BCN_{(k % 8) + 8 * (k // 16):07d}")
    _one_hot_frame(ids, labels, ISIC2019_CLASSES).to_csv(
        root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": ids, "age_approx": 55, "anatom_site_general": "anterior torso",
                  "lesion_id": lesions, "sex": "female"}).to_csv(
        root / "ISIC_2019_Training_Metadata.csv", index=False)
    return root


CXR_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
               "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
               "OriginalImagePixelSpacing[x", "y]", ""]
CXR_LABELS = ["No Finding", "Cardiomegaly", "Effusion|Infiltration", "Atelectasis",
              "Mass|Nodule", "Pneumothorax", "Hernia", "Pleural_Thickening|Effusion",
              "Consolidation|Edema", "Emphysema|Fibrosis|Pneumonia"]


def write_chestxray14(root: Path, n_patients: int = 30, per_patient: int = 2,
                      with_lists: bool = True, seed: int = 0) -> Path:
    """Data_Entry_2017.csv (full header), images_00N/images/*.png (grayscale) and the lists."""
    rng = np.random.default_rng(seed)
    rows, names = [], []
    for p in range(1, n_patients + 1):
        for f in range(per_patient):
            name = f"{p:08d}_{f:03d}.png"
            labels = CXR_LABELS[(p + f) % len(CXR_LABELS)]
            folder = root / f"images_{1 + (p - 1) * 2 // n_patients:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            _image(rng, (p + f) % 4, size=(20, 20), gray=True).save(folder / name)
            rows.append([name, labels, f, p, 50, "M", "PA", 2500, 2048, 0.143, 0.143, ""])
            names.append((p, name))
    pd.DataFrame(rows, columns=CXR_COLUMNS).to_csv(root / "Data_Entry_2017.csv", index=False)
    if with_lists:
        test_patients = set(range(1, n_patients + 1, 4))  # official test: whole patients
        (root / "test_list.txt").write_text(
            "\n".join(n for p, n in names if p in test_patients) + "\n")
        (root / "train_val_list.txt").write_text(
            "\n".join(n for p, n in names if p not in test_patients) + "\n")
    return root


def write_medmnist(root: Path, flag: str, size: int = 28, n=(40, 12, 12), channels: int = 3,
                   labels: int = 9, multilabel: bool = False, seed: int = 0) -> Path:
    """``{flag}.npz`` (size 28) or ``{flag}_{size}.npz`` with the six published arrays."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size) + ((channels,) if channels == 3 else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if multilabel:
            arrays[f"{split}_labels"] = (rng.random((count, labels)) < 0.3).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(count) % labels).reshape(-1, 1).astype(np.uint8)
    path = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    np.savez(path, **arrays)
    return path


def write_folder(root: Path, classes=("benign", "malignant", "normal"), per_class: int = 14,
                 splits: bool = False, seed: int = 0) -> Path:
    """``root/<class>/img_k.png`` or ``root/{train,val,test}/<class>/img_k.png``."""
    rng = np.random.default_rng(seed)
    parts = {"train": per_class, "val": 3, "test": 3} if splits else {"": per_class}
    for part, n in parts.items():
        for c, name in enumerate(classes):
            folder = root / part / name if part else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                _image(rng, c).save(folder / f"img_{k:03d}.png")
    return root


def write_pneumonia(root: Path, patients: int = 12, seed: int = 0) -> Path:
    """``root/chest_xray/{train,test}/{NORMAL,PNEUMONIA}/`` named as in the Kermany release:
    ``IM-0115-0001.jpeg`` and ``NORMAL2-IM-0587-0001.jpeg`` (normal), ``person12_bacteria_3.jpeg``
    and ``person12_virus_4.jpeg`` (pneumonia); several images per patient."""
    rng = np.random.default_rng(seed)
    img = 0
    for split, n in (("train", patients), ("test", 3)):
        for p in range(n):
            pid = p + (0 if split == "train" else 500)
            normal = root / "chest_xray" / split / "NORMAL"
            sick = root / "chest_xray" / split / "PNEUMONIA"
            normal.mkdir(parents=True, exist_ok=True)
            sick.mkdir(parents=True, exist_ok=True)
            prefix = "NORMAL2-IM" if p % 2 else "IM"
            for k in range(1 + p % 3):
                _image(rng, 0).save(normal / f"{prefix}-{pid:04d}-{k + 1:04d}.jpeg")
                kind = "bacteria" if k % 2 == 0 else "virus"
                img += 1
                _image(rng, 1).save(sick / f"person{pid}_{kind}_{img}.jpeg")
    return root / "chest_xray"


def write_csv_dataset(root: Path, multilabel: bool = False, n: int = 40, seed: int = 0) -> Path:
    """``root/labels.csv`` with path,diagnosis (or path,finding_a,finding_b,finding_c),
    patient_id; images under ``root/imgs/``."""
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        label = k % 3
        _image(rng, label).save(root / "imgs" / f"case_{k:03d}.jpg")
        row = {"path": f"imgs/case_{k:03d}.jpg", "patient_id": f"P{k // 2:03d}"}
        if multilabel:
            row.update({"finding_a": int(k % 2 == 0), "finding_b": int(k % 3 == 0),
                        "finding_c": int(k % 5 == 0)})
        else:
            row["diagnosis"] = ["benign", "malignant", "normal"][label]
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def corrupt(path: Path, truncate: bool = True) -> None:
    """Truncate an image file to a third (or overwrite it with junk)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if truncate else b"not an image at all")


def write_isic2016(root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> Path:
    """ISBI2016_ISIC_Part3_{Training,Test}_Data/ + the two ground-truth CSVs as published: no
    header, CRLF, training labels ``benign``/``malignant``, test labels ``0.0``/``1.0``."""
    rng = np.random.default_rng(seed)
    counter = iter(range(10**7))
    for split, n in (("Training", n_train), ("Test", n_test)):
        folder = root / f"ISBI2016_ISIC_Part3_{split}_Data"
        folder.mkdir(parents=True)
        rows = []
        for k in range(n):
            label = int(k % 3 == 0)  # about a third malignant, as in the release (~20%)
            image_id = f"ISIC_{next(counter):07d}"
            _image(rng, label).save(folder / f"{image_id}.jpg")
            text = ("malignant" if label else "benign") if split == "Training" else f"{label:.1f}"
            rows.append(f"{image_id},{text}\r\n")
        (root / f"ISBI2016_ISIC_Part3_{split}_GroundTruth.csv").write_bytes("".join(rows).encode())
    return root


MESSIDOR_BASES = ("Base11", "Base12", "Base13", "Base21", "Base22", "Base23", "Base31", "Base32")


def write_messidor(root: Path, per_base: int = 8, xlsx_bases: int = 1, seed: int = 0,
                   bases: tuple[str, ...] = MESSIDOR_BASES) -> Path:
    """``Base*/`` folders (``bases``) of ``.tif`` fundus images, each with
    ``Annotation_Base*.xls`` as released (the last ``xlsx_bases`` as ``.xlsx``); the released
    columns, including the trailing space of ``Risk of macular edema ``."""
    import xlwt

    rng = np.random.default_rng(seed)
    for b, base in enumerate(bases):
        folder = root / base
        folder.mkdir(parents=True)
        rows = []
        for k in range(per_base):
            grade = k % 4
            name = f"2005{b:02d}{k:02d}_{38557 + 100 * b + k}_0100_PP.tif"
            _image(rng, grade, size=(24, 20)).save(folder / name)
            rows.append((name, f"Service Ophtalmologie {b // 3 + 1}", grade, k % 3))
        columns = ("Image name", "Ophthalmologic department", "Retinopathy grade",
                   "Risk of macular edema ")
        if b >= len(bases) - xlsx_bases:
            pd.DataFrame(rows, columns=columns).to_excel(folder / f"Annotation_{base}.xlsx",
                                                         index=False)
            continue
        book = xlwt.Workbook()
        sheet = book.add_sheet("Feuil1")
        for c, col in enumerate(columns):
            sheet.write(0, c, col)
        for r, row in enumerate(rows, start=1):
            for c, value in enumerate(row):
                sheet.write(r, c, value)
        book.save(str(folder / f"Annotation_{base}.xls"))
    return root
