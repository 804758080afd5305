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

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .files import index_images, missing_files_error
from .splits import merge_groups, split_indices
from .table import ImageTable, ImageTableDataModule, check_data_dir, read_csv_checked

log = logging.getLogger(__name__)

__all__ = ["HAM10000DataModule", "HAM10000_CLASSES", "lesion_grouped_split"]

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")


def lesion_grouped_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Row indices of train/val/test, stratified by ``labels`` and grouped by ``groups``
    (lesion ids): :func:`datamodules.splits.split_indices` with a test split."""
    return split_indices(labels, groups, val_fraction, test_fraction, seed)


def merge_duplicate_images(frame: pd.DataFrame, meta: Path) -> pd.DataFrame:
    """An image id listed more than once (the same file under two lesion ids) is kept once, and
    the lesions it links are merged into one group, so the split can put neither the image nor
    those lesions' other images in two splits. Rows of one image with different ``dx`` stop
    with one line naming the image."""
    dup = frame[frame.duplicated("image_id", keep=False)]
    if dup.empty:
        return frame
    for image_id, rows in dup.groupby("image_id"):
        if rows["dx"].nunique() > 1:
            raise ValueError(f"{meta}: image {image_id} is listed {len(rows)} times with "
                             f"different dx {sorted(rows['dx'].unique())}")
    links = [(rows["lesion_id"].iloc[0], other) for _, rows in dup.groupby("image_id")
             for other in rows["lesion_id"].iloc[1:]]
    lesions = merge_groups(frame["lesion_id"].to_numpy(dtype=object), links)
    frame = frame.assign(lesion_id=lesions)
    log.warning("%s: %d image id(s) listed under more than one lesion id (e.g. %s); each image "
                "is kept once and the lesions it links stay in one split", meta,
                dup["image_id"].nunique(), dup["image_id"].iloc[0])
    return frame.drop_duplicates("image_id", keep="first").reset_index(drop=True)


class HAM10000DataModule(ImageTableDataModule):
    """HAM10000 from ``data_dir`` in the official layout; see the module docstring.

    Args:
        data_dir: folder holding ``HAM10000_metadata.csv`` and the image folders.
        image_size: side of the square images fed to the model (pixels).
        val_fraction, test_fraction: approximate split sizes (lesion-grouped, stratified).
        augmentation: training augmentation preset (``dermoscopy``, ``flips``, ``none``) or a
            Hydra node; see :mod:`datamodules.augment`.
        preload: decode and resize every image once at setup and keep them in memory
            (``N * image_size**2 * 3`` bytes), instead of decoding JPEGs every epoch.
        cache_dir: decode once into a memory-mapped cache file there (shared by later runs).
        limit: use only the first ``limit`` lesions' images (quick experiments); ``None`` = all.
        num_classes, in_chans, task: fixed for HAM10000 (7, 3, multiclass); checked.
        Others: see :class:`~datamodules.table.ImageTableDataModule`.
    """

    dataset_name = "ham10000"

    dataset_options = ("data_dir", "metadata_file")

    def _limit(self, split_idx: dict) -> dict:
        return split_idx  # ``limit`` counts lesions here and is applied in read_table

    def read_table(self) -> ImageTable:
        hp = self.hparams
        root = Path(check_data_dir(hp.data_dir))
        meta = root / hp.metadata_file
        if not meta.is_file():
            raise FileNotFoundError(f"HAM10000 metadata file not found: {meta}")
        frame = read_csv_checked(meta, REQUIRED_COLUMNS)
        frame["dx"] = frame["dx"].str.strip().str.lower()
        unknown = sorted(set(frame["dx"]) - set(HAM10000_CLASSES))
        if unknown:
            raise ValueError(f"{meta}: unknown dx values {unknown}; expected {list(HAM10000_CLASSES)}")
        frame = merge_duplicate_images(frame, meta)
        if hp.limit is not None:
            keep = frame["lesion_id"].drop_duplicates().iloc[: int(hp.limit)]
            frame = frame[frame["lesion_id"].isin(keep)].reset_index(drop=True)
        files = index_images(root)
        paths = frame["image_id"].map(files)
        absent = frame.loc[paths.isna(), "image_id"].tolist()
        if absent:
            raise missing_files_error(absent, str(meta), str(root))
        frame["path"] = paths
        frame["label"] = frame["dx"].map({c: i for i, c in enumerate(HAM10000_CLASSES)})
        self.frame = frame
        return ImageTable(
            paths=frame["path"].tolist(), targets=frame["label"].to_numpy().astype(np.int64),
            class_names=list(HAM10000_CLASSES), task="multiclass", source=str(meta),
            groups=frame["lesion_id"].to_numpy(),
        )
