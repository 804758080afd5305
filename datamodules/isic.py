"""ISIC 2016 (Part 3), ISIC 2018 (task 3) and ISIC 2019 skin-lesion classification, in the
challenge layouts (ISIC 2016: see :class:`ISIC2016DataModule`).

ISIC 2018 (Codella et al. 2019; the training set is HAM10000), 7 classes::

    data_dir/ISIC2018_Task3_Training_Input/ISIC_0024306.jpg ...
    data_dir/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    data_dir/ISIC2018_Task3_Training_LesionGroupings.csv        (optional: image,lesion_id,...)
    data_dir/ISIC2018_Task3_Validation_Input/ + .../ISIC2018_Task3_Validation_GroundTruth.csv
    data_dir/ISIC2018_Task3_Test_Input/       + .../ISIC2018_Task3_Test_GroundTruth.csv

ISIC 2019 (Combalia et al. 2019), 9 columns (no training image is UNK)::

    data_dir/ISIC_2019_Training_Input/ISIC_0000000.jpg ...
    data_dir/ISIC_2019_Training_GroundTruth.csv
    data_dir/ISIC_2019_Training_Metadata.csv                      (optional: lesion_id)
    data_dir/ISIC_2019_Test_Input/ + ISIC_2019_Test_GroundTruth.csv   (optional)

Ground-truth CSVs have an ``image`` column and one-hot class columns (``1.0``/``0.0``). The
CSVs are found at ``data_dir`` or up to two folders below it. The official validation and test
sets are used where their ground truth is present; what is missing is carved from the training
set, stratified by class and grouped by lesion when lesion ids are available.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .files import resolve_images
from .table import (
    ImageTable,
    ImageTableDataModule,
    check_data_dir,
    find_file,
    one_hot_to_index,
    read_csv_checked,
)

__all__ = ["ISICDataModule", "ISIC2016DataModule", "ISIC2018DataModule", "ISIC2019DataModule",
           "read_isic2016_ground_truth"]


class ISICDataModule(ImageTableDataModule):
    """Shared reader of the ISIC challenge layouts; subclasses set the file names."""

    CLASSES: tuple[str, ...] = ()
    GROUND_TRUTH: dict[str, str] = {}   # split -> ground-truth CSV file name
    LESIONS: tuple[str, ...] = ()       # CSV files with image,lesion_id columns

    def read_table(self) -> ImageTable:
        root = check_data_dir(self.hparams.data_dir)
        frames = []
        for split, name in self.GROUND_TRUTH.items():
            path = find_file(root, name)
            if path is None:
                if split == "train":
                    raise FileNotFoundError(
                        f"{self.dataset_name}: ground truth {name} not found in {root} "
                        "(nor up to two folders below it)")
                continue
            frame = read_csv_checked(path, ("image", *self.CLASSES))
            frame["label"] = one_hot_to_index(frame, list(self.CLASSES), path)
            frame["split"], frame["source"] = split, path
            frames.append(frame[["image", "label", "split", "source"]])
        frame = pd.concat(frames, ignore_index=True)
        paths = resolve_images(frame["image"].tolist(), frame["source"].tolist(), root)
        groups = frame["image"].to_numpy().copy()
        for name in self.LESIONS:
            lesion_csv = find_file(root, name)
            if lesion_csv is None:
                continue
            lesions = read_csv_checked(lesion_csv, ("image", "lesion_id"))
            mapping = dict(zip(lesions["image"], lesions["lesion_id"], strict=True))
            ids = frame["image"].map(mapping).fillna("").to_numpy()
            groups = np.where(ids != "", ids, groups)
        return ImageTable(
            paths=paths, targets=frame["label"].to_numpy(),
            class_names=list(self.CLASSES), task="multiclass",
            source=os.path.join(root, self.GROUND_TRUTH["train"]),
            splits=frame["split"].to_numpy(), groups=groups,
        )


class ISIC2018DataModule(ISICDataModule):
    """ISIC 2018 task 3 (7 classes); see the module docstring for the layout."""

    dataset_name = "isic2018"
    CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    GROUND_TRUTH = {
        "train": "ISIC2018_Task3_Training_GroundTruth.csv",
        "val": "ISIC2018_Task3_Validation_GroundTruth.csv",
        "test": "ISIC2018_Task3_Test_GroundTruth.csv",
    }
    LESIONS = ("ISIC2018_Task3_Training_LesionGroupings.csv",)


class ISIC2019DataModule(ISICDataModule):
    """ISIC 2019 (8 diagnoses + UNK); see the module docstring for the layout."""

    dataset_name = "isic2019"
    CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
    GROUND_TRUTH = {
        "train": "ISIC_2019_Training_GroundTruth.csv",
        "test": "ISIC_2019_Test_GroundTruth.csv",
    }
    LESIONS = ("ISIC_2019_Training_Metadata.csv", "ISIC_2019_Test_Metadata.csv")


ISIC2016_LABELS = {"benign": 0, "malignant": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1}


def read_isic2016_ground_truth(path: str) -> pd.DataFrame:
    """An ISBI 2016 Part 3 ground-truth CSV as published: no header, CRLF line endings, one
    ``image_id,label`` row per image; labels ``benign``/``malignant`` (training file) or
    ``0.0``/``1.0`` (test file). A header row, if a copy added one, is skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False,
                            skip_blank_lines=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"cannot parse {path}: {err}") from err
    if frame.shape[1] != 2:
        raise ValueError(f"{path}: expected 2 columns (image_id,label) without a header, "
                         f"found {frame.shape[1]}")
    frame.columns = ["image", "label"]
    frame = frame.apply(lambda col: col.str.strip())
    labels = frame["label"].str.lower()
    if len(frame) and labels.iloc[0] not in ISIC2016_LABELS and not frame["image"].iloc[0] \
            .upper().startswith("ISIC_"):
        frame, labels = frame.iloc[1:], labels.iloc[1:]  # a header row
    bad = ~labels.isin(list(ISIC2016_LABELS))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}: {int(bad.sum())} row(s) with a label that is not benign/"
                         f"malignant/0/1, e.g. row {row + 1}: {frame['image'].iloc[row]!r}, "
                         f"{frame['label'].iloc[row]!r}")
    if frame.empty:
        raise ValueError(f"{path} lists no images")
    frame = frame.assign(label=labels.map(ISIC2016_LABELS).astype(np.int64))
    return frame.reset_index(drop=True)


class ISIC2016DataModule(ImageTableDataModule):
    """ISBI 2016 / ISIC 2016 Part 3, lesion classification, benign (0) vs malignant (1)
    (Gutman et al., arXiv:1605.01397), the dermoscopy task of Xu et al. (MedIA 2021)::

        data_dir/ISBI2016_ISIC_Part3_Training_Data/ISIC_0000000.jpg ...
        data_dir/ISBI2016_ISIC_Part3_Training_GroundTruth.csv   (no header; benign|malignant)
        data_dir/ISBI2016_ISIC_Part3_Test_Data/ISIC_0000003.jpg ...
        data_dir/ISBI2016_ISIC_Part3_Test_GroundTruth.csv       (no header; 0.0|1.0)

    The official test set is the test split; validation is carved from the training images,
    stratified by label (the release has no lesion ids: each image is its own group).

    Args:
        data_dir: the folder holding the two CSVs (found up to two folders below it).
        train_csv, test_csv: the ground-truth file names.
        Others: see :class:`~datamodules.table.ImageTableDataModule`.
    """

    dataset_name = "isic2016"
    dataset_options = ("data_dir", "train_csv", "test_csv")
    CLASSES = ("benign", "malignant")

    def read_table(self) -> ImageTable:
        hp = self.hparams
        root = check_data_dir(hp.data_dir)
        frames = []
        for split, name in (("train", hp.train_csv), ("test", hp.test_csv)):
            path = find_file(root, name)
            if path is None:
                raise FileNotFoundError(f"isic2016: ground truth {name} not found in {root} "
                                        "(nor up to two folders below it)")
            frame = read_isic2016_ground_truth(path)
            frame["split"], frame["source"] = split, path
            frames.append(frame)
        frame = pd.concat(frames, ignore_index=True)
        paths = resolve_images(frame["image"].tolist(), frame["source"].tolist(), root)
        return ImageTable(
            paths=paths, targets=frame["label"].to_numpy(),
            class_names=list(self.CLASSES), task="multiclass", source=frames[0]["source"][0],
            splits=frame["split"].to_numpy(), groups=None,
        )
