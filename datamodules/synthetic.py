"""The embedded default dataset: synthetic "dermoscopy-like" images with real class structure.

No files and no network: images are generated from a seed. Each image is a skin-toned
background with a smooth illumination gradient, a dark elliptical "lesion" of random colour,
size and position, Gaussian sensor noise, and two class cues:

- a low-contrast oriented stripe texture, one orientation per class (``multiclass``), or one
  stripe pattern per present finding, several at once (``multilabel``). It identifies the class
  exactly, but its contrast (``signal_amplitude``, 0.04 in the default config, in [0, 1] pixel
  units) is about that of an L-inf attack of 8/255: a non-robust feature;
- the lesion's hue, shifted by ``colour_amplitude`` (0.17 in the default config; 0 = off)
  towards a class colour (the sum of the colours of the present findings for ``multilabel``).
  The random lesion colour makes the classes overlap (at most ~90% accuracy from hue alone,
  ~67% against 8/255), but 8/255 moves it only a little: a robust, less predictive feature.

With the default config a small CNN trained on clean images learns the stripes (clean accuracy
~1.0, PGD-10 at 8/255 near 0), while adversarial training has to fall back on the hue and shows
the usual trade-off (clean ~0.9, robust ~0.7).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from lightning_modules.core.tasks import TASKS

from .base import SplitDataModule

__all__ = ["SyntheticDataModule", "make_synthetic"]


def make_synthetic(
    n: int,
    num_classes: int,
    image_size: int = 32,
    in_chans: int = 3,
    task: str = "multiclass",
    signal_amplitude: float = 0.1,
    noise_std: float = 0.04,
    seed: int = 0,
    colour_amplitude: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` images ``(n, in_chans, S, S)`` in [0, 1] and their labels.

    Labels are class indices ``(n,)`` for ``multiclass`` and multi-hot floats
    ``(n, num_classes)`` for ``multilabel`` (each finding present with probability 0.4).
    """
    if task not in TASKS:
        raise ValueError(f"datamodule.task={task!r} must be one of {list(TASKS)}")
    g = torch.Generator().manual_seed(seed)
    s = image_size
    coords = torch.linspace(-1.0, 1.0, s)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # Skin background with an illumination gradient, per-image tone.
    tone = torch.tensor([0.85, 0.65, 0.55])[:in_chans] if in_chans <= 3 else torch.full((in_chans,), 0.7)
    if in_chans == 1:
        tone = torch.tensor([0.7])
    tone = tone.view(1, -1, 1, 1) + 0.08 * (rand(n, in_chans, 1, 1) - 0.5)
    grad_dir = rand(n, 1, 1, 1) * 2 * math.pi
    illum = 0.08 * (torch.cos(grad_dir) * xx + torch.sin(grad_dir) * yy)
    img = tone + illum

    # Lesion: a dark ellipse of random size, aspect, position and colour (label-independent).
    cx, cy = 0.5 * (rand(n, 1, 1) - 0.5), 0.5 * (rand(n, 1, 1) - 0.5)
    ax, ay = 0.3 + 0.35 * rand(n, 1, 1), 0.3 + 0.35 * rand(n, 1, 1)
    r2 = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    mask = torch.sigmoid((1.0 - r2) * 8.0).unsqueeze(1)  # soft border
    lesion_colour = 0.25 + 0.25 * rand(n, in_chans, 1, 1)

    if task == "multiclass":
        labels = torch.randint(0, num_classes, (n,), generator=g)
        present = torch.nn.functional.one_hot(labels, num_classes).float()
    else:
        present = (rand(n, num_classes) < 0.4).float()
        labels = present

    # Second class cue, robust but overlapping: the lesion colour is shifted towards a class
    # colour (hue), which the random lesion colour above blurs, so no classifier gets it right
    # for every image. No random draws: the stream (and the data at colour_amplitude=0) is
    # unchanged.
    if colour_amplitude:
        protos = _colour_prototypes(num_classes, in_chans)  # (K, C)
        lesion_colour = lesion_colour + colour_amplitude * (present @ protos).view(n, in_chans, 1, 1)
    img = img * (1 - mask) + lesion_colour * mask

    # Class signal: oriented stripes (frequency jittered, random phase).
    angles = torch.arange(num_classes) * math.pi / num_classes  # (K,)
    freq = 3.0 + 1.5 * rand(n, num_classes, 1, 1)
    phase = 2 * math.pi * rand(n, num_classes, 1, 1)
    proj = torch.cos(angles).view(1, -1, 1, 1) * xx + torch.sin(angles).view(1, -1, 1, 1) * yy
    stripes = torch.sin(2 * math.pi * freq * proj / 2 + phase)  # (n, K, S, S)
    amp = signal_amplitude * (0.75 + 0.5 * rand(n, num_classes, 1, 1))
    signal = (present.view(n, num_classes, 1, 1) * amp * stripes).sum(1, keepdim=True)
    img = img + signal

    img = img + noise_std * torch.randn(img.shape, generator=g)
    return img.clamp_(0.0, 1.0).contiguous(), labels


def _colour_prototypes(num_classes: int, in_chans: int) -> torch.Tensor:
    """Unit class colours ``(K, C)``: evenly spaced hues (angles on the circle of colours of
    equal brightness) for ``C >= 3``; evenly spaced levels in [-1, 1] along one direction
    (brightness for ``C == 1``, red-green for ``C == 2``) otherwise."""
    if in_chans >= 3:
        e1 = torch.zeros(in_chans)
        e2 = torch.zeros(in_chans)
        e1[:3] = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2.0)
        e2[:3] = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6.0)
        theta = torch.arange(num_classes) * 2 * math.pi / num_classes
        return torch.cos(theta)[:, None] * e1 + torch.sin(theta)[:, None] * e2
    direction = torch.ones(in_chans) if in_chans == 1 else torch.tensor([1.0, -1.0]) / math.sqrt(2.0)
    levels = torch.linspace(-1.0, 1.0, num_classes) if num_classes > 1 else torch.zeros(1)
    return levels[:, None] * direction


class SyntheticDataModule(SplitDataModule):
    """Seeded synthetic train/val/test splits (see module docstring); nothing on disk."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        task: str,
        image_size: int,
        n_train: int,
        n_val: int,
        n_test: int,
        signal_amplitude: float,
        noise_std: float,
        seed: int,
        colour_amplitude: float,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        sampler: str | None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"datamodule.task={task!r} must be one of {list(TASKS)}")
        for key, val in (("num_classes", num_classes), ("n_train", n_train), ("n_val", n_val),
                         ("n_test", n_test), ("batch_size", batch_size), ("image_size", image_size)):
            if int(val) < 1:
                raise ValueError(f"datamodule.{key}={val} must be >= 1")
        if task == "multiclass" and num_classes < 2:
            raise ValueError(f"datamodule.num_classes={num_classes} must be >= 2 for multiclass")
        self.save_hyperparameters(logger=False)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.task = task
        self.class_names = [f"stripes_{i * 180 // num_classes}deg" for i in range(num_classes)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        for offset, (split, n) in enumerate(
            (("train", hp.n_train), ("val", hp.n_val), ("test", hp.n_test))
        ):
            x, y = make_synthetic(
                n, hp.num_classes, hp.image_size, hp.in_chans, hp.task,
                hp.signal_amplitude, hp.noise_std, seed=hp.seed + 7919 * offset,
                colour_amplitude=hp.colour_amplitude,
            )
            self.datasets[split] = TensorDataset(x, y)

    def targets(self, split: str):
        self.setup()
        return self.datasets[split].tensors[1].numpy()
