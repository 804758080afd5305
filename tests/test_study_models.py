"""The second study's models: the attention-guided VGG (Yan et al., IPMI 2019), local vgg16_bn
weights into it, the timm presets (DenseNet-121, Inception-v3), and the start-up check of the
image size a backbone can take."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from lightning_modules.core.errors import ConfigError
from lightning_modules.models.attn_vgg import AttentionBlock
from lightning_modules.models.backbones import attn_vgg, check_input_size
from lightning_modules.training.build import build


def test_attention_block_formula():
    torch.manual_seed(0)
    block = AttentionBlock(local_chans=3, global_chans=5, attn_chans=4, normalize=True)
    local, glob = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    pooled, attn = block(local, glob)
    guide = torch.nn.functional.interpolate(block.global_proj(glob), size=(4, 4),
                                            mode="bilinear", align_corners=False)
    scores = block.score(torch.relu(block.local_proj(local) + guide)).flatten(1)
    a = scores.softmax(-1)
    assert torch.allclose(attn.flatten(1), a, atol=1e-6)
    assert torch.allclose(pooled, torch.einsum("ns,ncs->nc", a, local.flatten(2)), atol=1e-5)
    block.normalize = False
    pooled, attn = block(local, glob)
    assert torch.allclose(pooled, (torch.sigmoid(scores).view(2, 1, 4, 4) * local).mean((2, 3)),
                          atol=1e-6)


def test_attn_vgg_shapes_gradients_and_maps():
    torch.manual_seed(0)
    model = attn_vgg(num_classes=2, in_chans=3, width=4).eval()
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 2)
    (grad,) = torch.autograd.grad(out[:, 1].sum(), x)
    assert grad.abs().sum() > 0
    maps = model.net.attention_maps(torch.rand(3, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(3, 1, 8, 8), (3, 1, 4, 4)]
    assert torch.allclose(maps[0].flatten(1).sum(1), torch.ones(3), atol=1e-5)
    # VGG-16-BN: 13 convolutions; the head reads [g, g_pool3, g_pool4] = 8w + 4w + 8w features
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 + 2 * 3
    assert model.net.classifier.in_features == 20 * 4


def test_vgg16_bn_weights_load_from_a_local_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.vgg16_bn(weights=None)
    state = {k: v for k, v in reference.state_dict().items() if k.startswith("features.")}
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    model = attn_vgg(num_classes=2, width=64, weights_path=str(path))
    ours = [m for m in model.net.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    theirs = [m for m in reference.features if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(ours, theirs, strict=True))
    bn_ours = [m for m in model.net.blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_theirs = [m for m in reference.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert torch.equal(bn_ours[-1].running_var, bn_theirs[-1].running_var)
    with pytest.raises(ValueError, match="is backbone.width 64"):
        attn_vgg(num_classes=2, width=8, weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="weights_path"):
        attn_vgg(num_classes=2, width=8, weights_path=str(tmp_path / "none.pth"))


@pytest.mark.parametrize("preset,size", [("densenet121", 32), ("inception_v3", 75),
                                         ("attn_vgg", 32)])
def test_backbone_presets_build_and_take_their_smallest_size(train_cfg, preset, size):
    cfg = train_cfg(f"backbone={preset}", f"datamodule.image_size={size}",
                    "datamodule.num_classes=2")
    net = instantiate(cfg.backbone, _convert_="all")
    check_input_size(net, 3, size)  # one forward pass of a blank image
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, size, size)).shape == (1, 2)


def test_image_too_small_for_the_backbone_is_one_line(train_cfg):
    cfg = train_cfg("backbone=timm", "backbone.name=inception_v3", "datamodule.image_size=32")
    with pytest.raises(ConfigError, match=r"backbone \(.*timm_model, inception_v3\): the "
                                          r"backbone cannot take 32x32 images"):
        build(cfg)


def test_multiclass_auroc_ranks_softmax_probabilities_as_sklearn():
    """Binary tasks (ISIC 2016, referable DR) report AUROC: that of the positive class's softmax
    probability, even for logits inside [0, 1] (which torchmetrics would rank raw)."""
    from sklearn.metrics import roc_auc_score

    from lightning_modules.evaluation.metrics import build_metrics

    torch.manual_seed(0)
    logits = torch.rand(64, 2)  # inside [0, 1]
    y = torch.randint(0, 2, (64,))
    metrics = build_metrics("multiclass", 2)
    metrics.update(logits, y)
    expected = roc_auc_score(y.numpy(), logits.softmax(-1)[:, 1].numpy())
    assert float(metrics.compute()["auroc"]) == pytest.approx(expected, abs=1e-5)
    logits3, y3 = torch.randn(90, 3), torch.arange(90) % 3
    metrics = build_metrics("multiclass", 3)
    metrics.update(logits3, y3)
    expected = roc_auc_score(y3.numpy(), logits3.softmax(-1).numpy(), multi_class="ovr")
    assert float(metrics.compute()["auroc"]) == pytest.approx(expected, abs=1e-5)
