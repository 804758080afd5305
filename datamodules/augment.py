"""Training-time augmentation: albumentations pipelines on ``uint8 (H, W, C)`` images.

Chosen with ``datamodule.augmentation``: a preset name, ``none``, or a Hydra node with a
``_target_`` (e.g. ``albumentations.Compose``) for a pipeline of your own. Presets (strengths
as fractions of the image side or of the intensity range):

- ``dermoscopy``: skin lesions have no canonical orientation: horizontal and vertical flips,
  90-degree rotations, a free rotation (+-180 deg, reflected border), mild colour jitter
  (brightness/contrast/saturation 0.1, hue 0.02) for camera and lighting differences.
- ``xray``: small affine (scale 0.95-1.05, shift 3%, rotation +-5 deg) and brightness/contrast
  0.1. No horizontal flip: anatomy is lateralised (heart on the left).
- ``flips``: horizontal and vertical flips and 90-degree rotations (histology, cells).
- ``none``: nothing.
- ``dermoscopy_c``, ``xray_c``, ``fundus_c``, ``general_c``: the domain's preset above (none for
  fundus and general), then, with probability 0.5, one corruption of the domain's MedMNIST-C
  set at a random severity (``lightning_modules.evaluation.corruptions.images.CorruptionAugment``; MedMNIST-C,
  Di Salvo et al. 2024, trains with its corruptions this way).

Augmentation is for training images only; validation and test images are never augmented.

Reproducibility: albumentations draws from its own generator, which the global seeds do not
reach. :func:`build_augmentation` seeds it from ``torch.initial_seed()`` (the run's ``seed``),
and :func:`seed_worker` re-seeds each dataloader worker's copy from that worker's torch seed
(distinct per worker, derived from the run's seed), so the same seed gives the same run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AUGMENTATIONS", "build_augmentation", "seed_worker"]

AUGMENTATIONS = ("none", "flips", "dermoscopy", "xray", "dermoscopy_c", "xray_c", "fundus_c",
                 "general_c")


def _preset(name: str, in_chans: int):
    import albumentations as A
    import cv2

    if name.endswith("_c") and name in AUGMENTATIONS:
        from lightning_modules.evaluation.corruptions.images import CorruptionAugment

        domain = name[:-2]
        base = _preset(domain, in_chans) if domain in ("dermoscopy", "xray") else None
        return CorruptionAugment(domain, p=0.5, base=base)
    if name == "flips":
        return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)])
    if name == "dermoscopy":
        steps = [
            A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5),
            A.Affine(rotate=(-180, 180), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        ]
        if in_chans == 3:
            steps.append(A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02,
                                       p=0.5))
        else:
            steps.append(A.RandomBrightnessContrast(0.1, 0.1, p=0.5))
        return A.Compose(steps)
    if name == "xray":
        return A.Compose([
            A.Affine(scale=(0.95, 1.05), translate_percent=(-0.03, 0.03), rotate=(-5, 5),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ])
    raise ValueError(f"datamodule.augmentation={name!r} is not a preset; choose one of "
                     f"{list(AUGMENTATIONS)} or give a node with a _target_")


def _seed(transform, seed: int) -> None:
    if hasattr(transform, "set_random_seed"):  # albumentations pipelines
        transform.set_random_seed(int(seed) % 2**32)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: first Lightning's worker seeding where ``seed_everything(...,
    workers=True)`` asked for it (distinct per rank and worker), then the worker's copy of the
    dataset's transform from the worker's torch seed (derived from the run's seed)."""
    import os

    import torch

    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _seed(getattr(info.dataset, "transform", None), torch.initial_seed())


def build_augmentation(spec: Any, in_chans: int):
    """The training transform for ``spec`` (preset name, ``None``/``"none"``, or a Hydra node),
    seeded from ``torch.initial_seed()`` plus the DDP rank."""
    import torch

    transform = _build(spec, in_chans)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 0
    _seed(transform, torch.initial_seed() + rank)  # DDP ranks draw different augmentations
    return transform


def _build(spec: Any, in_chans: int):
    if spec is None or spec is False or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str):
        return _preset(spec.lower(), in_chans)
    if hasattr(spec, "get") and spec.get("_target_"):
        from hydra.utils import instantiate

        return instantiate(spec, _convert_="all")
    if callable(spec):
        return spec
    raise ValueError(f"datamodule.augmentation={spec!r}: expected a preset name "
                     f"{list(AUGMENTATIONS)}, 'none', or a node with a _target_")
