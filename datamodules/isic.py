"""ISIC 2018 (task 3) and ISIC 2019 skin-lesion classification, in the challenge layouts.

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

from .files import index_images, missing_files_error
from .table import (
    ImageTable,
    ImageTableDataModule,
    check_data_dir,
    find_file,
    one_hot_to_index,
    read_csv_checked,
)

__all__ = ["ISICDataModule", "ISIC2018DataModule", "ISIC2019DataModule"]


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
        files = index_images(root)
        paths = frame["image"].map(files)
        missing = paths.isna()
        if missing.any():
            raise missing_files_error(frame.loc[missing, "image"].tolist(),
                                      ", ".join(sorted(set(frame.loc[missing, "source"]))), root)
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
            paths=paths.tolist(), targets=frame["label"].to_numpy(),
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
