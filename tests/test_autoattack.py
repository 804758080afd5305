"""AutoAttack through the authors' pyautoattack: components by number of classes, the attack
contract (ball, pixel range, eps 0), and never weaker than our PGD on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.attacks import attack_from_config
from lightning_modules.attacks.autoattack import components_for

pytest.importorskip("pyautoattack")


def test_components_follow_the_number_of_classes():
    assert components_for(2) == (["apgd-ce", "square"], 1)
    assert components_for(3) == (["apgd-ce", "apgd-dlr", "fab-t", "square"], 2)
    assert components_for(7) == (["apgd-ce", "apgd-t", "fab-t", "square"], 6)
    assert components_for(100) == (["apgd-ce", "apgd-t", "fab-t", "square"], 9)
    assert components_for(14, max_targets=3)[1] == 3
    assert attack_from_config("autoattack", components=["apgd-ce"]).suite(7) == (["apgd-ce"], 6)
    with pytest.raises(ValueError, match="components"):
        attack_from_config("autoattack", components=["apgd-xx"])
    with pytest.raises(ValueError, match="square_queries"):
        attack_from_config("autoattack", square_queries=0)


def _robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_autoattack_in_ball_and_not_weaker_than_pgd(trained_model, norm, eps):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    # a CPU-sized suite: the standard components in L-inf (one target, 20 Square queries);
    # APGD-CE + Square in L2 (FAB is the costly part: seconds per image on a CPU)
    components = None if norm == "linf" else ["apgd-ce", "square"]
    aa = attack_from_config("autoattack", eps=eps, norm=norm, components=components, max_targets=1, square_queries=20)
    x_aa = aa(model, x, y)
    delta = (x_aa - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_aa.min() >= 0 and x_aa.max() <= 1
    pgd = attack_from_config("pgd", eps=eps, norm=norm, steps=20)
    torch.manual_seed(0)
    acc_pgd = _robust_acc(model, pgd(model, x, y), y)
    acc_aa = _robust_acc(model, x_aa, y)
    clean = _robust_acc(model, x, y)
    assert acc_aa <= acc_pgd + 1e-9, (acc_aa, acc_pgd)
    assert acc_aa < clean  # the attack does something
    assert torch.equal(aa.with_eps(0)(model, x, y), x)
    one = attack_from_config("autoattack", eps=eps, norm=norm, components=["apgd-ce"])
    assert torch.equal(one(model, x[:8], y[:8]), one(model, x[:8], y[:8]))  # seeded
    # channels-last images (module.channels_last) and a row subset of them, as the cascade
    # hands over, give the same result in the same memory format
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)[2:10]
    out_cl = one(cl_model, x_cl, y[2:10])
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_cl, one(model, x[2:10], y[2:10]), atol=1e-6)


def test_binary_model_runs_apgd_ce_and_square_and_multilabel_is_refused(trained_model):
    model, x, y = trained_model
    torch.manual_seed(0)
    binary = torch.nn.Sequential(model, torch.nn.Linear(4, 2))
    with torch.no_grad():
        y2 = binary(x[:16]).argmax(1)
    x_adv = attack_from_config("autoattack", eps=8 / 255, square_queries=20)(binary, x[:16], y2)
    assert _robust_acc(binary, x_adv, y2) < 1.0
    with pytest.raises(ValueError, match="single-label"):
        attack_from_config("autoattack")(model, x[:4], torch.zeros(4, 4), "multilabel")
