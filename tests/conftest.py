"""Shared fixtures: Hydra composition of the real configs, tiny trained models, HAM10000 data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from PIL import Image

from lightning_modules.core.config import register_resolvers

register_resolvers()

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_HAM = ROOT.parent / "shared" / "datasets" / "ham10000"

# Fast settings for in-process runs of train(): tiny data, 1 epoch, a couple of batches.
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "datamodule.n_train=64",
    "datamodule.n_val=32",
    "datamodule.n_test=32",
    "datamodule.batch_size=16",
    "datamodule.image_size=16",
    "print_summary=false",
]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as Hydra would, into ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    def make(*overrides: str) -> DictConfig:
        small = [] if any(o.startswith("backbone=") for o in overrides) else ["backbone.width=8"]
        fast = FAST
        if any(o.startswith("datamodule=") and o != "datamodule=synthetic" for o in overrides):
            fast = [o for o in FAST if not o.startswith("datamodule.n_")]
        return compose_cfg("train", [*fast, *small, *overrides], tmp_path / "run")

    return make


def write_ham_fixture(root: Path, n_lesions: int = 56, seed: int = 0) -> Path:
    """A tiny HAM10000 in the official layout: metadata CSV + JPEGs in two part folders.

    Every class has 8 lesions; some lesions have 2 images (as in the real release).
    """
    rng = np.random.default_rng(seed)
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    (root / "HAM10000_images_part_1").mkdir(parents=True, exist_ok=True)
    (root / "HAM10000_images_part_2").mkdir(parents=True, exist_ok=True)
    rows, img_no = [], 24306
    for lesion in range(n_lesions):
        dx = classes[lesion % len(classes)]
        for _ in range(1 + (lesion % 3 == 0)):
            image_id = f"ISIC_{img_no:07d}"
            part = 1 if img_no % 2 else 2
            pixels = rng.integers(0, 255, size=(15, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg")
            rows.append({"lesion_id": f"HAM_{lesion:07d}", "image_id": image_id, "dx": dx,
                         "dx_type": "histo", "age": "50.0", "sex": "male",
                         "localization": "back"})
            img_no += 1
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture
def ham_dir(tmp_path) -> Path:
    return write_ham_fixture(tmp_path / "ham10000")


@pytest.fixture(scope="session")
def trained_model():
    """A small CNN trained a few epochs on synthetic data (clean accuracy well above chance)."""
    from datamodules.synthetic import make_synthetic
    from lightning_modules.models.backbones import small_cnn

    torch.manual_seed(0)
    x, y = make_synthetic(512, 4, image_size=16, signal_amplitude=0.15, seed=3)
    model = small_cnn(4, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for i in range(0, 512, 64):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = make_synthetic(128, 4, image_size=16, signal_amplitude=0.15, seed=4)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.8, f"fixture model failed to learn (acc {acc:.2f})"
    return model, xt, yt


def attack_kwargs(name: str, **overrides) -> dict:
    """The constructor arguments of ``conf/attack/<name>.yaml`` with ``overrides``: for
    subclasses of an attack built in a test (``class NoOp(PGD)``)."""
    from omegaconf import OmegaConf

    from lightning_modules.attacks import attack_config

    node = OmegaConf.to_container(attack_config(name, **overrides))
    node.pop("_target_")
    return node
