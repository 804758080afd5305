"""Defenses: the loss each returns for a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.attacks import FGSM, PGD, cross_entropy_per_sample
from lightning_modules.backbones import small_cnn
from lightning_modules.defenses import AdversarialTraining, NoDefense


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return small_cnn(3, width=4).train(), torch.rand(8, 3, 12, 12), torch.randint(0, 3, (8,))


def test_none_is_clean_cross_entropy(batch):
    model, x, y = batch
    out = NoDefense()(model, x, y, cross_entropy_per_sample)
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y), atol=1e-6)
    assert out.logits_adv is None


def test_pgd_at_trains_on_adversarial_examples(batch):
    model, x, y = batch
    attack = PGD(8 / 255, steps=2, model_mode="train")  # batch statistics: order-independent
    torch.manual_seed(1)
    out = AdversarialTraining({"pgd": attack})(model, x, y, cross_entropy_per_sample)
    torch.manual_seed(1)
    x_adv = attack(model, x, y)
    expected = F.cross_entropy(model(x_adv), y)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.loss > F.cross_entropy(model(x), y)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_weights_and_clean_mix(batch):
    model, x, y = batch
    d = AdversarialTraining({"fgsm": FGSM(4 / 255, model_mode="train")}, weights={"fgsm": 0.5}, clean_weight=0.5)
    out = d(model, x, y, cross_entropy_per_sample)
    x_adv = FGSM(4 / 255, model_mode="train")(model, x, y)
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(x_adv), y)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.logits_clean is not None and out.logits_adv is not None


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        AdversarialTraining({"pgd": PGD(0.1)}, weights={"fgsm": 1.0})
    with pytest.raises(ValueError, match="clean_weight"):
        AdversarialTraining({"pgd": PGD(0.1)}, clean_weight=-1)
    with pytest.raises(ValueError, match="empty"):
        AdversarialTraining({})
