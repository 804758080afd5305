"""HAM10000 dermoscopy (Tschandl et al., Scientific Data 2018): 7 classes, official layout.

Layout read (as released on Harvard Dataverse)::

    data_dir/HAM10000_metadata.csv      lesion_id,image_id,dx,dx_type,age,sex,localization
    data_dir/HAM10000_images_part_1/    ISIC_xxxxxxx.jpg
    data_dir/HAM10000_images_part_2/    ISIC_xxxxxxx.jpg

Images are found in any sub-folder (or ``data_dir`` itself) by ``image_id``. The train/val/test
split is stratified by class and grouped by ``lesion_id``: several images show the same lesion,
and no lesion may appear in two splits (the test set would leak into training otherwise).
Images are resized to ``image_size`` x ``image_size`` and reach the model as floats in [0, 1].
Everything is checked when the datamodule is built, so bad input stops the run at start-up.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import Dataset

from .base import SplitDataModule

__all__ = ["HAM10000DataModule", "HAM10000_CLASSES", "lesion_grouped_split"]

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def lesion_grouped_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Row indices of train/val/test, stratified by ``labels`` and grouped by ``groups``.

    Uses ``StratifiedGroupKFold`` twice: one fold of ``round(1 / test_fraction)`` folds is the
    test set, then one fold of the rest is the validation set. The fractions are approximate
    (folds are whole groups); no group ever appears in two splits.
    """
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"datamodule.{key}={frac} must be in (0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("datamodule.val_fraction + datamodule.test_fraction must be < 1")
    idx = np.arange(len(labels))
    n_test = max(2, round(1.0 / test_fraction))
    sgkf = StratifiedGroupKFold(n_splits=n_test, shuffle=True, random_state=seed)
    rest, test = next(sgkf.split(idx, labels, groups))
    n_val = max(2, round((1.0 - test_fraction) / val_fraction))
    sgkf = StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=seed + 1)
    tr, va = next(sgkf.split(rest, labels[rest], groups[rest]))
    return {"train": idx[rest[tr]], "val": idx[rest[va]], "test": idx[test]}


def load_image(path: str, image_size: int) -> np.ndarray:
    """Decode ``path`` to an RGB ``uint8`` array ``(image_size, image_size, 3)``."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


class ImageListDataset(Dataset):
    """Images from a list of paths (or a pre-decoded uint8 array) with integer labels."""

    def __init__(self, paths: list[str], labels: np.ndarray, image_size: int,
                 transform=None, images: np.ndarray | None = None) -> None:
        self.paths, self.labels, self.image_size = paths, labels, image_size
        self.transform, self.images = transform, images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else load_image(self.paths[i], self.image_size)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        return x, int(self.labels[i])


def default_train_transform():
    """Dermoscopy has no canonical orientation: flips and 90-degree rotations (uint8 in/out)."""
    import albumentations as A

    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)])


class HAM10000DataModule(SplitDataModule):
    """HAM10000 from ``data_dir`` in the official layout; see the module docstring.

    Args:
        data_dir: folder holding ``HAM10000_metadata.csv`` and the image folders.
        image_size: side of the square images fed to the model (pixels).
        val_fraction, test_fraction: approximate split sizes (lesion-grouped, stratified).
        augment: flips and 90-degree rotations on the training split.
        preload: decode and resize every image once at setup and keep them in memory
            (``N * image_size**2 * 3`` bytes), instead of decoding JPEGs every epoch.
        limit: use only the first ``limit`` lesions' images (quick experiments); ``None`` = all.
        num_classes, in_chans, task: fixed for HAM10000 (7, 3, multiclass); checked.
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        augment: bool = True,
        preload: bool = False,
        limit: int | None = None,
        metadata_file: str = "HAM10000_metadata.csv",
        num_classes: int = 7,
        in_chans: int = 3,
        task: str = "multiclass",
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if num_classes != len(HAM10000_CLASSES):
            raise ValueError(f"datamodule.num_classes={num_classes}: HAM10000 has 7 classes")
        if in_chans != 3:
            raise ValueError(f"datamodule.in_chans={in_chans}: HAM10000 images are RGB (3)")
        if task != "multiclass":
            raise ValueError(f"datamodule.task={task!r}: HAM10000 is single-label (multiclass)")
        if int(image_size) < 8:
            raise ValueError(f"datamodule.image_size={image_size} must be >= 8")
        self.num_classes, self.in_chans, self.task = num_classes, in_chans, task
        self.class_names = list(HAM10000_CLASSES)
        self.frame = self._read_index(data_dir, metadata_file, limit)
        self.split_idx = lesion_grouped_split(
            self.frame["label"].to_numpy(), self.frame["lesion_id"].to_numpy(),
            val_fraction, test_fraction, seed,
        )

    @staticmethod
    def _read_index(data_dir: str | None, metadata_file: str, limit: int | None) -> pd.DataFrame:
        if data_dir is None or str(data_dir) in ("", "???"):
            raise ValueError("datamodule.data_dir is not set: give the HAM10000 folder, "
                             "e.g. datamodule.data_dir=/data/ham10000")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"datamodule.data_dir={str(root)!r} is not a directory")
        meta = root / metadata_file
        if not meta.is_file():
            raise FileNotFoundError(f"HAM10000 metadata file not found: {meta}")
        try:
            frame = pd.read_csv(meta, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
            raise ValueError(f"cannot parse {meta}: {err}") from err
        missing_cols = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing_cols:
            raise ValueError(f"{meta} lacks the columns {missing_cols} "
                             f"(found {list(frame.columns)}; expected {list(REQUIRED_COLUMNS)})")
        if frame.empty:
            raise ValueError(f"{meta} lists no images")
        frame["dx"] = frame["dx"].str.strip().str.lower()
        unknown = sorted(set(frame["dx"]) - set(HAM10000_CLASSES))
        if unknown:
            raise ValueError(f"{meta}: unknown dx values {unknown}; expected {list(HAM10000_CLASSES)}")
        if limit is not None:
            keep = frame["lesion_id"].drop_duplicates().iloc[: int(limit)]
            frame = frame[frame["lesion_id"].isin(keep)].reset_index(drop=True)
        files: dict[str, str] = {}
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_SUFFIXES:
                    files.setdefault(stem, os.path.join(dirpath, name))
        paths = frame["image_id"].map(files)
        absent = frame.loc[paths.isna(), "image_id"].tolist()
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {meta} are missing under {root}, "
                f"e.g. {absent[:5]}"
            )
        frame["path"] = paths
        frame["label"] = frame["dx"].map({c: i for i, c in enumerate(HAM10000_CLASSES)})
        return frame

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        for split, idx in self.split_idx.items():
            paths = self.frame["path"].iloc[idx].tolist()
            labels = self.frame["label"].iloc[idx].to_numpy()
            images = None
            if hp.preload:
                with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
                    images = np.stack(list(pool.map(lambda p: load_image(p, hp.image_size), paths)))
            transform = default_train_transform() if (split == "train" and hp.augment) else None
            self.datasets[split] = ImageListDataset(paths, labels, hp.image_size, transform, images)

    def class_counts(self, split: str) -> dict[str, int]:
        labels = self.frame["label"].iloc[self.split_idx[split]]
        counts = labels.value_counts().to_dict()
        return {c: int(counts.get(i, 0)) for i, c in enumerate(HAM10000_CLASSES)}
