"""Messidor (Decencière et al., Image Analysis & Stereology 2014): 1,200 fundus photographs
graded for diabetic retinopathy, the fundus task of Xu et al. (MedIA 2021).

Layout read (as released: one folder per image base, each with its annotation spreadsheet)::

    data_dir/Base11/20051019_38557_0100_PP.tif ...
    data_dir/Base11/Annotation_Base11.xls      Image name | Ophthalmologic department |
    ...                                        Retinopathy grade | Risk of macular edema
    data_dir/Base34/Annotation_Base34.xls

Spreadsheets are ``.xls`` (as released; read by pandas with ``xlrd``, the reader pandas names
for that format) or ``.xlsx`` (``openpyxl``); they are found anywhere under ``data_dir``.
Targets (``target``): ``grade``, the retinopathy grade 0-3 (4 classes, default), or
``referable``, grade >= 2 against 0-1 (binary). The release publishes no split: train,
validation and test are carved stratified by target and grouped by image base, so no base
(one department's acquisition batch) is in two splits.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd

from .files import resolve_images
from .table import ImageTable, ImageTableDataModule, check_data_dir

__all__ = ["MessidorDataModule", "read_annotations", "TARGETS"]

COLUMNS = ("Image name", "Retinopathy grade")
TARGETS = {
    "grade": ["grade 0", "grade 1", "grade 2", "grade 3"],
    "referable": ["non-referable (grade 0-1)", "referable (grade 2-3)"],
}


def read_annotations(path: str) -> pd.DataFrame:
    """One Messidor annotation spreadsheet as ``image``, ``grade`` (int 0-3) and ``base``."""
    engine = "xlrd" if path.lower().endswith(".xls") else "openpyxl"
    try:
        frame = pd.read_excel(path, dtype=str, engine=engine)
    except ImportError as err:
        raise ImportError(f"reading {path} needs the {engine} package (pip install {engine})"
                          ) from err
    except Exception as err:  # noqa: BLE001 - every reader error becomes one line naming the file
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} (found {list(frame.columns)})")
    frame = frame.dropna(subset=["Image name"])
    frame = frame[frame["Image name"].str.strip() != ""]
    if frame.empty:
        raise ValueError(f"{path} lists no images")
    grade = pd.to_numeric(frame["Retinopathy grade"].str.strip(), errors="coerce")
    bad = ~grade.isin([0, 1, 2, 3])
    if bad.any():
        row = frame[bad].iloc[0]
        raise ValueError(f"{path}: {int(bad.sum())} row(s) whose 'Retinopathy grade' is not 0-3, "
                         f"e.g. {row['Image name']!r}: {row['Retinopathy grade']!r}")
    base = os.path.splitext(os.path.basename(path))[0].removeprefix("Annotation_")
    return pd.DataFrame({
        "image": [os.path.splitext(s.strip())[0] for s in frame["Image name"]],
        "grade": grade.astype(np.int64).to_numpy(), "base": base, "source": path,
    })


class MessidorDataModule(ImageTableDataModule):
    """Messidor from ``data_dir`` in the released layout; see the module docstring.

    Args:
        data_dir: folder holding the ``Base*`` folders (or the images and spreadsheets anywhere
            below it).
        target: ``grade`` (4 classes) or ``referable`` (grade >= 2, binary).
        Others: see :class:`~datamodules.table.ImageTableDataModule`.
    """

    dataset_name = "messidor"
    dataset_options = ("data_dir", "target")

    def read_table(self) -> ImageTable:
        hp = self.hparams
        if hp.target not in TARGETS:
            raise ValueError(f"datamodule.target={hp.target!r} must be one of {list(TARGETS)}")
        root = check_data_dir(hp.data_dir)
        sheets = sorted(p for p in glob.glob(os.path.join(root, "**", "Annotation_*.xls*"),
                                             recursive=True)
                        if p.lower().endswith((".xls", ".xlsx")))
        if not sheets:
            raise FileNotFoundError(f"messidor: no Annotation_*.xls or .xlsx file under {root}")
        frame = pd.concat([read_annotations(p) for p in sheets], ignore_index=True)
        paths = resolve_images(frame["image"].tolist(), frame["source"].tolist(), root)
        grade = frame["grade"].to_numpy()
        targets = grade if hp.target == "grade" else (grade >= 2).astype(np.int64)
        return ImageTable(
            paths=paths, targets=targets, class_names=list(TARGETS[hp.target]),
            task="multiclass", source=", ".join(sheets[:2]) + (" ..." if len(sheets) > 2 else ""),
            splits=None, groups=frame["base"].to_numpy(),
        )
