"""The fast attack path equals a straightforward reference PGD (same random start)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.attacks import attack_from_config
from lightning_modules.defenses import AdversarialTraining
from lightning_modules.models.backbones import small_cnn


def reference_pgd(model, x, y, eps, steps, alpha):
    """Textbook PGD (Madry et al.): eval mode, uniform start, sign steps, projection."""
    was_training = model.training
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = small_cnn(5, width=8).train()
    x = torch.rand(16, 3, 16, 16)
    y = torch.randint(0, 5, (16,))
    return model, x, y


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_adversarial_examples_as_reference(setup, channels_last):
    model, x, y = setup
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    eps, steps = 8 / 255, 5
    torch.manual_seed(7)
    ours = attack_from_config("pgd", eps=eps, steps=steps, model_mode="eval")(model, x, y)
    torch.manual_seed(7)
    ref = reference_pgd(model, x, y, eps, steps, 2.5 * eps / steps)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert (ours - x).abs().max() > eps / 2  # and it is a real attack


def test_parameter_gradients_equal_reference(setup):
    model, x, y = setup
    eps, steps = 8 / 255, 3
    defense = AdversarialTraining(attacks={"pgd": attack_from_config("pgd", eps=eps, steps=steps, model_mode="eval")}, weights=None, clean_weight=0.0, name="adversarial_training")
    state = copy.deepcopy(model.state_dict())  # the training forward updates BN statistics
    torch.manual_seed(11)
    defense(model, x, y, "multiclass").loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    torch.manual_seed(11)
    x_adv = reference_pgd(model, x, y, eps, steps, 2.5 * eps / steps)
    F.cross_entropy(model(x_adv), y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6), name
