"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 14 thoracic findings, multi-label, grayscale.

Layout read (as released by the NIH Clinical Center)::

    data_dir/Data_Entry_2017.csv        Image Index,Finding Labels,Follow-up #,Patient ID,...
    data_dir/images/00000001_000.png    or data_dir/images_001/images/00000001_000.png ...
    data_dir/train_val_list.txt         official split: one image file name per line
    data_dir/test_list.txt

``Finding Labels`` holds ``|``-separated findings; ``No Finding`` is the all-zero target. Targets
are multi-hot in the published order (:data:`FINDINGS`). The official lists fix the test set;
the validation set is carved from ``train_val_list`` grouped by ``Patient ID`` (no patient in two
splits). Without the lists the whole set is split by patient. Images are read as grayscale
(``in_chans: 1``) and resized to ``image_size``.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .files import index_images, missing_files_error
from .table import ImageTable, ImageTableDataModule, check_data_dir, find_file, read_csv_checked

__all__ = ["ChestXray14DataModule", "FINDINGS", "parse_findings"]

log = logging.getLogger("medrobust.data")

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"


def parse_findings(labels: list[str], source: str) -> np.ndarray:
    """Multi-hot ``(N, 14)`` float32 from ``Finding Labels`` strings; unknown names raise."""
    index = {f.lower(): i for i, f in enumerate(FINDINGS)}
    index["pleural thickening"] = index["pleural_thickening"]
    out = np.zeros((len(labels), len(FINDINGS)), dtype=np.float32)
    unknown: dict[str, int] = {}
    for row, text in enumerate(labels):
        for name in (t.strip() for t in str(text).split("|")):
            if not name or name.lower() == NO_FINDING.lower():
                continue
            i = index.get(name.lower())
            if i is None:
                unknown[name] = unknown.get(name, 0) + 1
            else:
                out[row, i] = 1.0
    if unknown:
        raise ValueError(f"{source}: unknown findings {unknown} (name: rows); expected "
                         f"{list(FINDINGS)} or {NO_FINDING!r}")
    return out


def _read_list(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip()}


class ChestXray14DataModule(ImageTableDataModule):
    """ChestX-ray14 from ``data_dir`` in the NIH layout; see the module docstring.

    Args:
        data_dir: folder with ``Data_Entry_2017.csv``, the image folders and the split lists.
        labels_file, train_val_list, test_list: file names (found up to two folders below).
        Others: see :class:`~datamodules.table.ImageTableDataModule` (``in_chans`` 1,
        ``augmentation`` ``xray``, ``val_fraction`` of the train_val patients).
    """

    dataset_name = "chestxray14"
    dataset_options = ("data_dir", "labels_file", "train_val_list", "test_list")

    def read_table(self) -> ImageTable:
        hp = self.hparams
        root = check_data_dir(hp.data_dir)
        csv = find_file(root, hp.labels_file)
        if csv is None:
            raise FileNotFoundError(f"ChestX-ray14 labels file {hp.labels_file} not found in {root}")
        frame = read_csv_checked(csv, ("Image Index", "Finding Labels", "Patient ID"))
        targets = parse_findings(frame["Finding Labels"].tolist(), csv)
        files = index_images(root)
        stems = frame["Image Index"].map(lambda s: os.path.splitext(s.strip())[0])
        paths = stems.map(files)
        if paths.isna().any():
            raise missing_files_error(frame.loc[paths.isna(), "Image Index"].tolist(), csv, root)
        splits = None
        tv_path, test_path = find_file(root, hp.train_val_list), find_file(root, hp.test_list)
        if tv_path and test_path:
            train_val, test = _read_list(tv_path), _read_list(test_path)
            names = frame["Image Index"].str.strip()
            both = sorted(train_val & test & set(names))
            if both:
                log.warning("%d image(s) are in both %s and %s (e.g. %s); they are kept in the "
                            "test split only", len(both), tv_path, test_path, both[0])
            splits = np.where(names.isin(test), "test",
                              np.where(names.isin(train_val), "train", "none"))
            dropped = int((splits == "none").sum())
            if dropped:
                log.warning("%d image(s) of %s are in neither %s nor %s; left out", dropped, csv,
                            tv_path, test_path)
            keep = splits != "none"
            frame, targets, paths, splits = frame[keep], targets[keep], paths[keep], splits[keep]
        elif tv_path or test_path:
            raise FileNotFoundError(f"found only one of {hp.train_val_list} and {hp.test_list} "
                                    f"in {root}: give both (official split) or neither")
        return ImageTable(
            paths=paths.tolist(), targets=targets, class_names=list(FINDINGS),
            task="multilabel", source=csv, splits=splits,
            groups=frame["Patient ID"].str.strip().to_numpy(),
        )
