"""MedMNIST v2 / MedMNIST+ (Yang et al., Scientific Data 2023): the 2D datasets from ``.npz``.

Files read: ``data_dir/{flag}.npz`` (28x28) or ``data_dir/{flag}_{size}.npz`` (64, 128, 224),
with ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels`` (images ``uint8 (N, H, W)`` or ``(N, H, W, 3)``; labels ``(N, 1)`` class
indices, or ``(N, 14)`` multi-hot for ``chestmnist``). The official splits are used as they are.

The task, number of classes and channels come from the flag (:data:`MEDMNIST_INFO`):
binary-class and ordinal-regression flags train as single-label softmax classifiers,
``chestmnist`` as multi-label. If the file is missing, it is downloaded through the ``medmnist``
package when that is installed and the network answers; otherwise the error says where to put
the file.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib

import numpy as np
import torch

from .augment import build_augmentation
from .base import SplitDataModule
from .dataset import ImageDataset

__all__ = ["MedMNISTDataModule", "MEDMNIST_INFO", "medmnist_file"]

log = logging.getLogger("medrobust.data")

_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen"]
# flag -> (task as published, channels, class names)
MEDMNIST_INFO: dict[str, tuple[str, int, list[str]]] = {
    "pathmnist": ("multi-class", 3, [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
        "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]),
    "chestmnist": ("multi-label, binary-class", 1, [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"]),
    "dermamnist": ("multi-class", 3, [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions"]),
    "octmnist": ("multi-class", 1, [
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "pneumoniamnist": ("binary-class", 1, ["normal", "pneumonia"]),
    "retinamnist": ("ordinal-regression", 3, ["0", "1", "2", "3", "4"]),
    "breastmnist": ("binary-class", 1, ["malignant", "normal, benign"]),
    "bloodmnist": ("multi-class", 3, [
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet"]),
    "tissuemnist": ("multi-class", 1, [
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
        "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
        "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
    "organamnist": ("multi-class", 1, _ORGANS),
    "organcmnist": ("multi-class", 1, _ORGANS),
    "organsmnist": ("multi-class", 1, _ORGANS),
}
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def medmnist_file(data_dir: str, flag: str, size: int) -> str:
    """Where the ``.npz`` of ``flag`` at ``size`` lives (``{flag}.npz`` for 28 if present)."""
    sized = os.path.join(data_dir, f"{flag}_{size}.npz")
    plain = os.path.join(data_dir, f"{flag}.npz")
    if size == 28 and not os.path.isfile(sized):
        return plain
    return sized


def _download(data_dir: str, flag: str, size: int) -> None:
    try:
        import medmnist
    except ImportError:
        return
    info = getattr(medmnist, "INFO", {}).get(flag, {})
    cls = getattr(medmnist, info.get("python_class", ""), None)
    if cls is None:
        return
    os.makedirs(data_dir, exist_ok=True)
    try:
        kwargs = {} if size == 28 else {"size": size}
        cls(split="train", root=data_dir, download=True, **kwargs)
    except Exception as err:  # network down, server error: fall through to the clear error
        log.warning("medmnist download of %s (size %d) failed: %s", flag, size, err)


def _warn_shared_images(path: str, images: dict[str, np.ndarray]) -> None:
    """One warning with the count when the official splits hold pixel-identical images (the
    splits are kept as published; a count says how far test accuracy may flatter)."""
    import hashlib

    seen: dict[bytes, str] = {}
    shared: dict[str, int] = {}
    for split, arr in images.items():
        for img in arr:
            key = hashlib.sha1(np.ascontiguousarray(img).tobytes()).digest()
            first = seen.setdefault(key, split)
            if first != split:
                pair = f"{first}/{split}"
                shared[pair] = shared.get(pair, 0) + 1
    if shared:
        log.warning("%s: pixel-identical images in two official splits (%s); the splits are "
                    "kept as published", path,
                    ", ".join(f"{n} {pair}" for pair, n in sorted(shared.items())))


class MedMNISTDataModule(SplitDataModule):
    """One MedMNIST 2D dataset; see the module docstring.

    Args:
        flag: dataset name, e.g. ``pathmnist``, ``chestmnist``, ``dermamnist``.
        data_dir: folder with the ``.npz`` files (``~`` allowed).
        size: which published resolution to read (28, 64, 128, 224).
        image_size: side fed to the model (pixels); ``null`` = ``size``; resized once at setup.
        num_classes, in_chans, task: ``null`` = from the flag; checked when given.
        augmentation: ``none``, ``flips``, ``dermoscopy``, ``xray`` or a Hydra node.
        sampler: ``null`` or ``weighted`` (class-balanced draws).
    """

    def __init__(self, *, flag: str, data_dir: str, size: int, image_size: int | None,
                 num_classes: int | None, in_chans: int | None, task: str | None,
                 augmentation, sampler: str | None, batch_size: int,
                 eval_batch_size: int | None, num_workers: int, pin_memory: bool, seed: int,
                 download: bool, limit: int | None) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        flag = str(flag).lower()
        if flag not in MEDMNIST_INFO:
            raise ValueError(f"datamodule.flag={flag!r} is not a MedMNIST 2D dataset; choose "
                             f"one of {sorted(MEDMNIST_INFO)}")
        if int(size) not in SIZES:
            raise ValueError(f"datamodule.size={size} must be one of {list(SIZES)}")
        kind, chans, names = MEDMNIST_INFO[flag]
        self.flag, self.class_names = flag, list(names)
        self.num_classes = len(names)
        self.task = "multilabel" if kind.startswith("multi-label") else "multiclass"
        self.in_chans = chans
        for key, want, got in (("num_classes", num_classes, self.num_classes),
                               ("in_chans", in_chans, self.in_chans), ("task", task, self.task)):
            if want is not None and want != got:
                raise ValueError(f"datamodule.{key}={want!r} but {flag} has {key}={got!r}")
        self.image_size = int(image_size or size)
        self.path = self._locate(os.path.expanduser(str(data_dir)), flag, int(size), download)
        self.arrays = self._load(self.path)

    @staticmethod
    def _locate(data_dir: str, flag: str, size: int, download: bool) -> str:
        path = medmnist_file(data_dir, flag, size)
        if not os.path.isfile(path) and download:
            _download(data_dir, flag, size)
            path = medmnist_file(data_dir, flag, size)
        if not os.path.isfile(path):
            name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
            raise FileNotFoundError(
                f"MedMNIST file {path} not found: put {name} (from https://zenodo.org/records/"
                f"10519652 or `pip install medmnist`, which downloads it) into "
                f"datamodule.data_dir={data_dir}")
        return path

    def _load(self, path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
        except KeyError as err:
            raise ValueError(f"{path} lacks the array {err}; a MedMNIST file has "
                             f"{[f'{s}_{k}' for s in SPLITS for k in ('images', 'labels')]}") from err
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(f"cannot read {path} (not a MedMNIST .npz, or damaged): "
                             f"{type(err).__name__}: {err}") from err
        out, published = {}, {}
        for split, (images, labels) in arrays.items():
            if images.ndim not in (3, 4) or len(images) == 0:
                raise ValueError(f"{path}: {split}_images must be (N, H, W) or (N, H, W, C) "
                                 f"with N >= 1, found shape {images.shape}")
            if images.ndim == 3:
                images = images[..., None]
            if images.shape[-1] != self.in_chans:
                raise ValueError(f"{path}: {split}_images have {images.shape[-1]} channel(s), "
                                 f"but {self.flag} has {self.in_chans}")
            labels = self._check_labels(labels, len(images), f"{path}: {split}_labels")
            limit = self.hparams.limit
            if limit is not None:
                images, labels = images[: int(limit)], labels[: int(limit)]
            published[split] = images
            out[split] = (self._resize(images.astype(np.uint8)), labels)
        _warn_shared_images(path, published)
        return out

    def _check_labels(self, labels: np.ndarray, n: int, where: str) -> np.ndarray:
        """``(N,)`` int64 class indices, or ``(N, K)`` float32 0/1 findings; anything else (a
        count that differs from the images', a fraction, a value out of range) is one error."""
        if not np.issubdtype(labels.dtype, np.number) or labels.ndim not in (1, 2) \
                or len(labels) != n:
            raise ValueError(f"{where} must be {n} numeric rows (one per image), found "
                             f"{labels.dtype} of shape {labels.shape}")
        labels = labels.reshape(n, -1)
        if self.task == "multilabel":
            if labels.shape[1] != self.num_classes or not np.isin(labels, (0, 1)).all():
                raise ValueError(f"{where} must be 0/1 of shape ({n}, {self.num_classes}), found "
                                 f"shape {labels.shape} with values {np.unique(labels)[:5]}")
            return labels.astype(np.float32)
        first = labels[:, 0]
        if labels.shape[1] != 1 or (first != np.round(first)).any() or first.min() < 0 \
                or first.max() >= self.num_classes:
            raise ValueError(f"{where} must be one class index 0..{self.num_classes - 1} per "
                             f"image, found shape {labels.shape}, values {first.min()}.."
                             f"{first.max()}")
        return first.astype(np.int64)

    def _resize(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1] == self.image_size and images.shape[2] == self.image_size:
            return images
        out = []
        for chunk in np.array_split(images, max(1, len(images) // 4096)):
            t = torch.from_numpy(chunk).permute(0, 3, 1, 2).float()
            t = torch.nn.functional.interpolate(t, size=(self.image_size,) * 2, mode="bilinear",
                                                antialias=True, align_corners=False)
            out.append(t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def targets(self, split: str) -> np.ndarray:
        return self.arrays[split][1]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, (images, labels) in self.arrays.items():
            transform = build_augmentation(self.hparams.augmentation, self.in_chans) \
                if split == "train" else None
            self.datasets[split] = ImageDataset(None, labels, self.image_size, self.in_chans,
                                                transform, images=images)
