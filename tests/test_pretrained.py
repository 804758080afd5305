"""Pretrained timm backbones without downloads: weights from a local file or a folder (a
Hugging Face snapshot, its normalisation statistics followed), and one line naming both options
when timm's own loading cannot get them (offline, empty cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.models.backbones import timm_model

timm = pytest.importorskip("timm")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A resnet18 state dict as timm publishes it (1000 classes), seeded, not trained."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=1000)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(net.state_dict(), folder / "resnet18.pth")
    return net.state_dict(), folder / "resnet18.pth"


def test_local_file_loads_the_weights_and_resizes_the_head(imagenet_like):
    state, path = imagenet_like
    model = timm_model("resnet18", num_classes=2, pretrained=True, weights_path=str(path))
    loaded = model.net.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert loaded["fc.weight"].shape == (2, 512)
    scratch = timm_model("resnet18", num_classes=2)
    assert not torch.equal(scratch.net.state_dict()["conv1.weight"], state["conv1.weight"])
    # ImageNet statistics, inside the model
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_snapshot_folder_loads_and_its_statistics_are_followed(imagenet_like, tmp_path):
    from safetensors.torch import save_file

    state, _ = imagenet_like
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "resnet18", "pretrained_cfg": {"mean": [0.5, 0.5, 0.5],
                                                         "std": [0.2, 0.2, 0.2]}}))
    model = timm_model("resnet18", num_classes=3, pretrained=True, weights_path=str(tmp_path))
    assert torch.equal(model.net.state_dict()["conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(model.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(model.std.flatten(), torch.full((3,), 0.2))


def test_bad_local_paths_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"backbone.weights_path=.*does not exist"):
        timm_model("resnet18", 2, pretrained=True, weights_path=str(tmp_path / "none.pth"))
    with pytest.raises(FileNotFoundError, match=r"is a folder with no weights files"):
        timm_model("resnet18", 2, pretrained=True, weights_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"weights_path is set but backbone.pretrained=false"):
        timm_model("resnet18", 2, weights_path=str(tmp_path))


def test_neither_hub_nor_file_is_one_line_naming_both(tmp_path):
    """Offline with an empty cache (a fresh process: the hub reads HF_HUB_OFFLINE at import)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "PYTHONPATH": str(ROOT)}
    code = ("from lightning_modules.models.backbones import timm_model\n"
            "timm_model('resnet18', 2, pretrained=True)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: backbone.pretrained=true: timm could not get"), last
    assert "backbone.weights_path" in last and "backbone.pretrained=false" in last
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
