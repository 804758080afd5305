"""AutoAttack through the authors' pyautoattack: components by number of classes, the attack
contract (ball, pixel range, eps 0), and never weaker than our PGD on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.attacks import AutoAttack, attack_from_config
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


def _settings(obj) -> dict:
    """An attack object's plain settings (numbers, strings, flags), its device left out."""
    return {k: v for k, v in vars(obj).items()
            if isinstance(v, (int, float, str, bool, type(None))) and k != "device"}


@pytest.mark.parametrize("threat", [[], ["threat.norm=l2", "threat.eps=0.5"]])
def test_standard_config_reaches_pyautoattack_as_its_standard_version(threat, tmp_path):
    """``conf/attack/autoattack.yaml`` against a 10-class model builds the pyautoattack object
    that ``version="standard"`` builds: the components, eps, norm, seed, and every setting of
    APGD-CE, APGD-T, FAB-T and Square (restarts, 9 target classes, 5000 Square queries, ...);
    a 4-class model differs only in its 3 target classes."""
    from unittest import mock

    import pyautoattack
    from torch import nn

    from lightning_modules.attacks import parse_eps
    from lightning_modules.core.config import instantiate_node
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", ["attack=autoattack", *threat], tmp_path)
    attack = instantiate_node(cfg, "attack")
    assert type(attack) is AutoAttack
    eps, norm = parse_eps(cfg.threat.eps, "threat.eps"), {"linf": "Linf", "l2": "L2"}[
        cfg.threat.norm]
    built = []

    def record(runner, x_in, y_in, **kwargs):
        built.append((runner, x_in, y_in, kwargs))
        return x_in.clone(), None

    for classes, targets in ((10, 9), (4, 3)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))
        x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
        built.clear()
        with mock.patch.object(pyautoattack.AutoAttack, "run_standard_evaluation", record):
            attack(model, x, y)
        ((runner, x_in, y_in, kwargs),) = built
        assert torch.equal(x_in, x) and torch.equal(y_in, y)
        standard = pyautoattack.AutoAttack(model, version="standard", eps=eps, norm=norm,
                                           seed=0, device="cpu")
        assert runner.attacks_to_run == standard.attacks_to_run == \
            ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert (runner.epsilon, runner.norm, runner.seed) == (eps, norm, 0)
        assert runner.model is model and kwargs == {"batch_size": 4}
        for part in ("apgd", "apgd_targeted", "fab", "square"):
            want = _settings(getattr(standard, part))
            for key in ("n_target_classes",) if classes < 10 else ():
                if key in want:
                    want[key] = targets
            assert _settings(getattr(runner, part)) == want, part
        assert runner.apgd_targeted.n_target_classes == runner.fab.n_target_classes == targets
        assert (runner.apgd.n_restarts, runner.apgd_targeted.n_restarts, runner.fab.n_restarts,
                runner.square.n_queries) == (1, 1, 1, 5000)
