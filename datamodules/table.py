"""The datamodule behind every on-disk dataset: a table of image files, labels, groups, splits.

A subclass only reads its published layout into an :class:`ImageTable` (:meth:`read_table`);
this class does the rest, identically for all of them:

- splits: rows the publisher assigned to ``val``/``test`` stay there; whatever is missing is
  carved out of the training rows, stratified by label and grouped by patient/lesion
  (:func:`~datamodules.splits.split_indices`), so no patient or lesion is in two splits;
- checks at start-up: a file listed twice (kept once, or an error if its rows disagree),
  empty split, wrong ``in_chans`` for the images, ``num_classes`` or ``task`` that contradict
  the data, and every image file of the splits (:func:`~datamodules.decode.check_image`:
  header and end of file, decoded only when it looks cut short), so an unreadable one is
  named before training: skipped with one warning line, or an error with ``strict``;
- loading: decode per epoch (default), ``preload`` (decode once into memory) or ``cache_dir``
  (decode once into a memory-mapped file shared by runs and workers), with unreadable images
  skipped or fatal (``strict``);
- augmentation (``datamodule.augmentation``, see :mod:`datamodules.augment`) on training
  images only, and an optional class-balanced ``sampler``.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lightning_modules.core.errors import ConfigError

from .augment import build_augmentation
from .base import SplitDataModule
from .cache import cache_name, decode_to_memory, open_cache
from .dataset import BadImageLog, ImageDataset
from .decode import check_in_chans, describe_unreadable, find_unreadable
from .splits import merge_groups, split_indices

__all__ = ["ImageTable", "ImageTableDataModule", "TABLE_OPTIONS", "find_file",
           "read_csv_checked", "check_data_dir", "one_hot_to_index", "drop_duplicate_files"]

log = logging.getLogger("medrobust.data")

SPLITS = ("train", "val", "test")

# Options every file-based datamodule takes. Their defaults live in one place only:
# conf/datamodule/base/{loader,files}.yaml (build from a config: datamodules.from_config).
TABLE_OPTIONS = (
    "image_size", "in_chans", "num_classes", "task", "val_fraction", "test_fraction", "seed",
    "batch_size", "eval_batch_size", "num_workers", "pin_memory", "augmentation", "sampler",
    "preload", "cache_dir", "strict", "limit",
)


@dataclass
class ImageTable:
    """What a dataset reader returns.

    Attributes:
        paths: one image file per row.
        targets: ``(N,)`` class indices (multiclass) or ``(N, K)`` multi-hot (multilabel).
        class_names: names of the classes/findings, in target order.
        task: ``multiclass`` or ``multilabel``.
        source: what the rows were read from (named in error messages).
        splits: ``(N,)`` of ``train``/``val``/``test`` where the publisher fixed the split
            (``None`` = split everything here).
        groups: ``(N,)`` patient or lesion ids (``None`` = every image its own group).
    """

    paths: list[str]
    targets: np.ndarray
    class_names: list[str]
    task: str
    source: str
    splits: np.ndarray | None = None
    groups: np.ndarray | None = None


class ImageTableDataModule(SplitDataModule):
    """Base of the file-based datamodules; subclasses implement :meth:`read_table` and list
    their own options in :attr:`dataset_options`. Every option is required (no defaults in code): the
    values come from ``conf/datamodule/<name>.yaml``, which extends ``base/files.yaml``.

    Common options (all in the datamodule YAMLs): ``data_dir``, ``image_size`` (pixels, square),
    ``in_chans`` (1 or 3; ``null`` = from the images), ``num_classes``/``task`` (``null`` =
    from the data; checked when given), ``val_fraction``/``test_fraction`` (used only for
    splits the publisher did not fix), ``seed``, ``augmentation``, ``sampler``, ``preload``,
    ``cache_dir``, ``strict``, ``limit`` (first N rows of each split), loader settings.
    """

    dataset_name = "images"
    dataset_options: tuple[str, ...] = ("data_dir",)  # the dataset's own options

    def __init__(self, **options) -> None:
        """Check ``options`` against :data:`TABLE_OPTIONS` and :attr:`dataset_options` (none missing,
        none unknown), save them as hparams, then read and split the data."""
        super().__init__()
        known = set(TABLE_OPTIONS) | set(self.dataset_options)
        unknown, missing = sorted(set(options) - known), sorted(known - set(options))
        if unknown:
            raise TypeError(f"unknown datamodule option(s) {unknown} for {type(self).__name__}; "
                            f"known: {sorted(known)}")
        if missing:
            raise TypeError(f"missing datamodule option(s) {missing} for {type(self).__name__}: "
                            "their defaults are in conf/datamodule/; build it with "
                            "datamodules.from_config(name, **overrides)")
        self.save_hyperparameters(options, logger=False)
        self._prepare()

    def read_table(self) -> ImageTable:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        hp = self.hparams
        if int(hp.image_size) < 8:
            raise ValueError(f"datamodule.image_size={hp.image_size} must be >= 8")
        table = self.read_table()
        if len(table.paths) == 0:
            raise ValueError(f"{table.source} lists no images")
        table = drop_duplicate_files(table)
        self.table = table
        self.task = table.task
        self.class_names = list(table.class_names)
        self.num_classes = len(self.class_names)
        if hp.get("task") not in (None, table.task):
            raise ValueError(f"datamodule.task={hp.task!r} but {table.source} is {table.task}")
        if hp.get("num_classes") not in (None, self.num_classes):
            raise ValueError(f"datamodule.num_classes={hp.num_classes} but {table.source} has "
                             f"{self.num_classes} classes: {self.class_names}")
        self.in_chans = check_in_chans(table.paths, hp.get("in_chans"))
        self.split_idx = self._limit(self._split(table))
        # path -> reason: unreadable images found at start-up or while decoding (skipped)
        self.unreadable: dict[str, str] = {}
        self._announced = 0
        self._drop_unreadable(self._check_files())
        for split in SPLITS:
            if len(self.split_idx.get(split, ())) == 0:
                raise ValueError(f"the {split} split of {table.source} is empty "
                                 f"(split sizes: { {k: len(v) for k, v in self.split_idx.items()} })")
        self.bad_log = BadImageLog()

    def _root(self) -> str:
        return os.path.expanduser(str(self.hparams.get("data_dir") or ""))

    def _check_files(self) -> dict[str, str]:
        """Every image file of the splits, checked cheaply (see :func:`find_unreadable`)."""
        paths = sorted({p for split in SPLITS for p in self.paths(split)})
        return find_unreadable(paths, int(self.hparams.image_size), self.in_chans)

    def _drop_unreadable(self, bad: dict[str, str]) -> None:
        """Unreadable files: one error line with ``strict``, else one warning line; they leave
        the splits (before any cache is keyed on them) and are counted in
        :meth:`skipped_images`."""
        if not bad:
            return
        if self.hparams.strict:
            raise ValueError(describe_unreadable(bad, True, self._root()))
        log.warning("%s", describe_unreadable(bad, False, self._root()))
        self.unreadable.update(bad)
        self._announced = len(self.unreadable)
        paths = np.array(self.table.paths, dtype=object)
        self.split_idx = {s: idx[~np.isin(paths[idx], list(bad))]
                          for s, idx in self.split_idx.items()}

    def _split(self, table: ImageTable) -> dict[str, np.ndarray]:
        hp = self.hparams
        n = len(table.paths)
        fixed = np.asarray(table.splits) if table.splits is not None else np.full(n, "train")
        unknown = sorted(set(fixed.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"{table.source}: unknown split names {unknown}; use {list(SPLITS)}")
        out = {s: np.flatnonzero(fixed == s) for s in SPLITS}
        train_rows = out["train"]
        need_test = len(out["test"]) == 0
        if len(out["val"]) == 0 or need_test:
            carved = split_indices(
                table.targets, table.groups, float(hp.val_fraction),
                float(hp.test_fraction) if need_test else None, int(hp.seed), rows=train_rows,
            )
            out["train"] = carved["train"]
            if len(out["val"]) == 0:
                out["val"] = carved["val"]
            else:  # official val, no official test: the carved val rows go back to train
                out["train"] = np.sort(np.concatenate([carved["train"], carved["val"]]))
            if need_test:
                out["test"] = carved["test"]
        _warn_shared_groups(table, out)
        return out

    def _limit(self, split_idx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``limit``: keep the first N images of each split (quick runs)."""
        limit = self.hparams.get("limit")
        if limit is None:
            return split_idx
        return {k: v[: int(limit)] for k, v in split_idx.items()}

    def targets(self, split: str) -> np.ndarray:
        return self.table.targets[self.split_idx[split]]

    def paths(self, split: str) -> list[str]:
        return [self.table.paths[i] for i in self.split_idx[split]]

    # ----------------------------------------------------------------------------- loading
    def _cache_file(self, split: str) -> tuple[str, list[int]]:
        hp = self.hparams
        paths = self.paths(split)
        name = cache_name(self.dataset_name, split, int(hp.image_size), self.in_chans, paths)
        return open_cache(hp.cache_dir, name, paths, int(hp.image_size), self.in_chans)

    def prepare_data(self) -> None:
        """Build the image caches once (rank 0 of each node) before ``setup`` reads them; with
        ``strict``, images the caches could not decode stop here (:class:`ConfigError`)."""
        if self.hparams.get("cache_dir"):
            self._check_decoded({split: self._cache_file(split)[1] for split in SPLITS})

    def _check_decoded(self, bad: dict[str, dict[int, str]]) -> None:
        """Rows of each split that decoding (preload, or the cache now or when it was built)
        could not read: with ``strict`` one :class:`ConfigError` naming them all, else they
        are counted in :meth:`skipped_images`."""
        found = {self.paths(split)[i]: why for split, rows in bad.items()
                 for i, why in rows.items()}
        if found and self.hparams.strict:
            raise ConfigError(describe_unreadable(found, True, self._root()))
        self.unreadable.update(found)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        size = int(hp.image_size)
        loaded: dict[str, tuple[np.ndarray | None, str | None, dict[int, str]]] = {}
        for split in SPLITS:
            if hp.get("cache_dir"):
                cache_file, bad = self._cache_file(split)
                loaded[split] = (None, cache_file, bad)
            elif hp.get("preload"):
                images, bad = decode_to_memory(self.paths(split), size, self.in_chans)
                loaded[split] = (images, None, bad)
            else:
                loaded[split] = (None, None, {})
        self._check_decoded({split: bad for split, (_, _, bad) in loaded.items()})
        for split, (images, cache_file, bad) in loaded.items():
            paths, targets = self.paths(split), self.targets(split)
            rows = np.setdiff1d(np.arange(len(paths)), list(bad))
            if len(rows) == 0:
                raise ConfigError(f"every image of the {split} split is unreadable, e.g. "
                                  f"{paths[:3]}")
            transform = build_augmentation(hp.augmentation, self.in_chans) if split == "train" \
                else None
            self.datasets[split] = ImageDataset(
                [paths[i] for i in rows], targets[rows], size, self.in_chans, transform,
                images=images, cache_file=cache_file, rows=rows, strict=bool(hp.strict),
                bad_log=self.bad_log,
            )
        self._announce()

    def skipped_images(self) -> list[str]:
        """Every image skipped as unreadable so far: found at start-up, by preload or the cache
        (now or when it was built) and while loading (all workers)."""
        return sorted(set(self.unreadable) | set(self.bad_log.paths()))

    def _announce(self) -> None:
        """One warning line for the unreadable images not yet reported."""
        for path, why in self.bad_log.reasons().items():
            self.unreadable.setdefault(path, why)
        if len(self.unreadable) > self._announced:
            log.warning("%s", describe_unreadable(self.unreadable, False, self._root()))
            self._announced = len(self.unreadable)

    def teardown(self, stage: str | None = None) -> None:
        self._announce()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """With ``strict``: an image a worker process could not decode stops the run here, in
        the main process, with one line (see :class:`~datamodules.dataset.ImageDataset`)."""
        if self.hparams.strict and len(self.bad_log):
            raise ConfigError(describe_unreadable(self.bad_log.reasons(), True, self._root()))
        return batch


def drop_duplicate_files(table: ImageTable) -> ImageTable:
    """A file listed more than once (the same path, or two paths to one file through symbolic
    or hard links) is kept once, with one warning and the count; the patients or lesions it was
    listed under are merged into one group, so neither the file nor their other images can be
    in two splits. Rows of one file with different labels or fixed splits are one error."""
    keys = [_file_key(p) for p in table.paths]
    first: dict = {}
    pairs = []
    for row, key in enumerate(keys):
        if first.setdefault(key, row) != row:
            pairs.append((first[key], row))
    if not pairs:
        return table
    targets = np.asarray(table.targets)
    for a, b in pairs:
        if not np.array_equal(targets[a], targets[b]):
            raise ValueError(f"{table.source}: {table.paths[b]} is listed twice with different "
                             f"labels ({_label(table, a)} and {_label(table, b)})")
        if table.splits is not None and table.splits[a] != table.splits[b]:
            raise ValueError(f"{table.source}: {table.paths[b]} is listed for both the "
                             f"{table.splits[a]} and the {table.splits[b]} split")
    groups = table.groups
    if groups is not None:
        groups = np.asarray(groups)
        groups = merge_groups(groups, [(groups[a], groups[b]) for a, b in pairs])
    keep = np.array(sorted(first.values()))
    log.warning("%s: %d file(s) listed more than once (%d extra row(s), e.g. %s); each is kept "
                "once%s", table.source, len({a for a, _ in pairs}), len(pairs),
                table.paths[pairs[0][1]],
                " and the groups (patients, lesions) it is listed under stay in one split"
                if groups is not None else "")
    return ImageTable(
        paths=[table.paths[i] for i in keep], targets=targets[keep],
        class_names=table.class_names, task=table.task, source=table.source,
        splits=None if table.splits is None else np.asarray(table.splits)[keep],
        groups=None if groups is None else groups[keep],
    )


def _file_key(path: str):
    """What makes two paths one file: device and inode (one ``stat``, cheaper than resolving
    links), or the normalised absolute path where there is no inode."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and st.st_ino:
        return st.st_dev, st.st_ino
    return os.path.normcase(os.path.abspath(path))


def _warn_shared_groups(table: ImageTable, split_idx: dict[str, np.ndarray]) -> None:
    """One warning with the count when a patient or lesion is in two splits. Splits carved here
    never share one; splits fixed by the data (a publisher's lists, a ``split_column``) can."""
    if table.groups is None:
        return
    groups = np.asarray(table.groups)
    where: dict = {}
    for split, idx in split_idx.items():
        for g in set(groups[idx].tolist()):
            where.setdefault(g, []).append(split)
    shared = sorted((g for g, s in where.items() if len(s) > 1), key=str)
    if shared:
        log.warning("%s: %d patient/lesion group(s) are in more than one split as the data "
                    "fixes them (e.g. %s in %s): their images are not independent across those "
                    "splits", table.source, len(shared), shared[0], " and ".join(where[shared[0]]))


def _label(table: ImageTable, row: int) -> str:
    t = np.asarray(table.targets)[row]
    if np.ndim(t):
        return "+".join(n for n, v in zip(table.class_names, t, strict=True) if v) or "none"
    return str(table.class_names[int(t)])


def read_csv_checked(path: str | os.PathLike, required: tuple[str, ...] = (), **kwargs
                     ) -> pd.DataFrame:
    """``pandas.read_csv`` with errors that name the file and the missing columns."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"cannot parse {path}: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} (found {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"{path} lists no images")
    return frame


def check_data_dir(data_dir) -> str:
    """``data_dir`` as an existing folder, or a clear error naming the key."""
    if data_dir is None or str(data_dir) in ("", "???"):
        raise ValueError("datamodule.data_dir is not set: give the dataset folder, "
                         "e.g. datamodule.data_dir=/data/...")
    root = os.path.expanduser(str(data_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"datamodule.data_dir={root!r} is not a directory")
    return root


def one_hot_to_index(frame: pd.DataFrame, columns: list[str], source: str) -> np.ndarray:
    """Class index per row from one-hot columns (``1``/``1.0``); every row needs exactly one."""
    try:
        onehot = frame[columns].astype(float).to_numpy()
    except ValueError as err:
        raise ValueError(f"{source}: class columns {columns} must hold 0/1 values ({err})") from err
    odd = ~np.isin(onehot, (0.0, 1.0))
    if odd.any():
        row, col = np.argwhere(odd)[0]
        raise ValueError(f"{source}: class columns must hold 0 or 1; row {row} column "
                         f"{columns[col]!r} is {frame[columns[col]].iloc[row]!r}")
    ones = (onehot > 0.5).sum(axis=1)
    bad = np.flatnonzero(ones != 1)
    if len(bad):
        raise ValueError(f"{source}: {len(bad)} row(s) do not have exactly one class among "
                         f"{columns}, e.g. rows {bad[:5].tolist()}")
    return onehot.argmax(axis=1).astype(np.int64)


def find_file(root: str | os.PathLike, name: str, depth: int = 2) -> str | None:
    """``root/name`` or the same name up to ``depth`` folders below ``root`` (first found)."""
    root = os.fspath(root)
    pattern = name
    for _ in range(depth + 1):
        hits = sorted(glob.glob(os.path.join(root, pattern)))
        if hits:
            return hits[0]
        pattern = os.path.join("*", pattern)
    return None
