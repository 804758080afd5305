r"""A user's own data with no code: a class-per-folder tree (``folder``) or a CSV (``csv``).

``folder``::

    data_dir/<class>/<any sub-folders>/<image>          split here (stratified)
    data_dir/{train,val,test}/<class>/.../<image>        splits given (val/test optional)

Classes are the sub-folder names, sorted (or ``classes`` to fix the order; a folder not listed
there is an error). ``group_pattern``: a regular expression searched in each file name whose
first group is the patient id, so that no patient is in two of the splits carved here (a file
it does not match is its own group); e.g. ``^(person\d+|(?:NORMAL2-)?IM-\d+)`` for the
pediatric pneumonia X-rays (``person1000_bacteria_2931.jpeg``, ``IM-0115-0001.jpeg``,
``NORMAL2-IM-0587-0001.jpeg``).

``csv``: a CSV with one row per image: a path column (relative to ``image_dir``, default
``data_dir``), and either one label column (single-label; values are class names) or several
0/1 columns (multi-label, ``label_columns``). Optional ``split_column`` (``train``/``val``/
``test``; ``valid``/``validation`` accepted) and ``group_column`` (patient id: no patient in two
splits).
"""

from __future__ import annotations

import os
import re

import numpy as np

from .files import IMAGE_SUFFIXES, missing_files_error
from .table import SPLITS, ImageTable, ImageTableDataModule, check_data_dir, read_csv_checked

__all__ = ["FolderDataModule", "CSVDataModule"]

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}


def _images_under(folder: str) -> list[str]:
    out = []
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(dirpath, n) for n in sorted(names)
                if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES and not n.startswith(".")]
    return out


def _subdirs(folder: str) -> list[str]:
    return sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))


def _class_index(values: list[str], classes: list[str] | None, source: str
                 ) -> tuple[np.ndarray, list[str]]:
    """Class indices of ``values`` and the class list (sorted unique values if not given)."""
    found = sorted(set(values))
    if classes is None:
        classes = found
    classes = [str(c) for c in classes]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{source}: labels {unknown[:10]} are not among the known classes "
                         f"{classes} (datamodule.classes)")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in values], dtype=np.int64), classes


def _groups(paths: list[str], pattern: str | None) -> np.ndarray | None:
    """Patient id per file: the first group of ``pattern`` in its name, else the path."""
    if not pattern:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"datamodule.group_pattern={pattern!r} is not a regular expression: "
                         f"{err}") from None
    if regex.groups < 1:
        raise ValueError(f"datamodule.group_pattern={pattern!r} needs a (group) for the "
                         "patient id")
    out = []
    for path in paths:
        match = regex.search(os.path.basename(path))
        out.append(match.group(1) if match and match.group(1) else path)
    return np.array(out, dtype=object)


class FolderDataModule(ImageTableDataModule):
    """Class-per-sub-folder images; see the module docstring."""

    dataset_name = "folder"

    dataset_options = ("data_dir", "classes", "group_pattern")

    def read_table(self) -> ImageTable:
        root = check_data_dir(self.hparams.data_dir)
        split_dirs = [s for s in _subdirs(root) if s in SPLITS]
        layout = [(s, os.path.join(root, s)) for s in split_dirs] if "train" in split_dirs \
            else [("train", root)]
        paths, labels, splits = [], [], []
        for split, folder in layout:
            for cls in _subdirs(folder):
                files = _images_under(os.path.join(folder, cls))
                paths += files
                labels += [cls] * len(files)
                splits += [split] * len(files)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders of "
                             f"{root}")
        found = sorted(set(labels))
        if len(found) < 2:
            inner = [d for d in _subdirs(os.path.join(layout[0][1], found[0]))] if found else []
            hint = (f"; it holds {inner[:6]}: point datamodule.data_dir at "
                    f"{os.path.join(layout[0][1], found[0])}" if inner else "")
            raise ValueError(f"datamodule.data_dir={root!r}: one class sub-folder {found} "
                             f"(a classifier needs two or more, one sub-folder per class, "
                             f"optionally under train/val/test){hint}")
        targets, classes = _class_index(labels, self.hparams.classes, root)
        return ImageTable(paths=paths, targets=targets, class_names=classes, task="multiclass",
                          source=root, splits=np.array(splits),
                          groups=_groups(paths, self.hparams.group_pattern))


class CSVDataModule(ImageTableDataModule):
    """Images listed in a CSV; see the module docstring.

    Args:
        data_dir: dataset folder; ``csv_file`` and ``image_dir`` are relative to it.
        csv_file: the CSV (one row per image).
        path_column: column with the image path (relative to ``image_dir`` or absolute).
        label_column: single-label: column of class names (or integers).
        label_columns: multi-label: list of 0/1 columns, one per finding (in that order).
        classes: single-label class order (default: sorted unique values); unknown labels fail.
        split_column, group_column: optional fixed splits and patient ids.
        image_dir: folder the paths are relative to (default ``data_dir``).
    """

    dataset_name = "csv"

    dataset_options = ("data_dir", "csv_file", "path_column", "label_column", "label_columns",
               "classes", "split_column", "group_column", "image_dir")

    def read_table(self) -> ImageTable:
        hp = self.hparams
        root = check_data_dir(hp.data_dir)
        if (hp.label_column is None) == (not hp.label_columns):
            raise ValueError("give exactly one of datamodule.label_column (single-label) and "
                             "datamodule.label_columns (multi-label)")
        csv = os.path.join(root, hp.csv_file)
        label_cols = [hp.label_column] if hp.label_column else list(hp.label_columns)
        optional = [c for c in (hp.split_column, hp.group_column) if c]
        frame = read_csv_checked(csv, (hp.path_column, *label_cols, *optional))
        image_dir = os.path.join(root, hp.image_dir) if hp.image_dir else root
        paths = [os.path.join(image_dir, p.strip()) for p in frame[hp.path_column]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise missing_files_error(missing, csv, image_dir)
        if hp.label_column:
            values = [v.strip() for v in frame[hp.label_column]]
            targets, classes = _class_index(values, hp.classes, f"{csv} column {hp.label_column!r}")
            task = "multiclass"
        else:
            raw = frame[label_cols].apply(lambda c: c.str.strip())
            bad = ~raw.isin(["0", "1", "0.0", "1.0"])
            if bad.any().any():
                row, col = np.argwhere(bad.to_numpy())[0]
                raise ValueError(f"{csv}: multi-label columns must hold 0/1; row {row} column "
                                 f"{label_cols[col]!r} is {raw.iat[row, col]!r}")
            targets = raw.astype(float).to_numpy().astype(np.float32)
            classes, task = label_cols, "multilabel"
        splits = groups = None
        if hp.split_column:
            names = frame[hp.split_column].str.strip().str.lower()
            unknown = sorted(set(names) - set(_SPLIT_ALIASES))
            if unknown:
                raise ValueError(f"{csv} column {hp.split_column!r}: unknown split names "
                                 f"{unknown}; use train/val/test")
            splits = names.map(_SPLIT_ALIASES).to_numpy()
        if hp.group_column:
            groups = frame[hp.group_column].str.strip().to_numpy()
        return ImageTable(paths=paths, targets=targets, class_names=classes, task=task,
                          source=csv, splits=splits, groups=groups)
