"""The fast default evaluation (PGD-20, then the fast attack on what PGD left) is not above
AutoAttack standard by more than one image on tiny trained models (4, 2 and 7 classes; a model
with a non-differentiable input step is compared in benchmarks/bench_fast_eval.py, and its
images are routed to Square here); passes are counted on the model; the third-party
attacks run in float32 under autocast and leave the global random state alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.attacks import attack_from_config
from lightning_modules.core.tasks import Task
from lightning_modules.evaluation.engine import RobustEvaluator
from lightning_modules.evaluation.passes import PassCounter

pytest.importorskip("pyautoattack")
TASK = Task("multiclass")


def _train(num_classes: int, seed: int):
    from datamodules.synthetic import make_synthetic
    from lightning_modules.models.backbones import small_cnn

    torch.manual_seed(seed)
    x, y = make_synthetic(512, num_classes, image_size=16, signal_amplitude=0.15, seed=seed)
    model = small_cnn(num_classes, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for i in range(0, 512, 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = make_synthetic(32, num_classes, image_size=16, signal_amplitude=0.15,
                            seed=seed + 1)
    return model.eval(), xt, yt


class Step(nn.Module):  # a non-differentiable input step: zero input gradient everywhere
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


def _default_robust(model, x, y, eps):
    """Per image: right under ``evaluation=standard`` (PGD-20 then fast, cascade)."""
    engine = RobustEvaluator("multiclass", int(model(x[:1]).shape[1]),
                             {"pgd": attack_from_config("pgd_eval", eps=eps),
                              "fast": attack_from_config("fast", eps=eps)},
                             worst_case={"worst": ["pgd", "fast"]}, cascade=True)
    out = engine.attack_batch(model, x, y)
    return ~TASK.wrong(out.clean, y) & ~TASK.wrong(out.worst["worst"], y), out


@pytest.mark.parametrize("classes,seed,eps,wrap,n", [
    (4, 3, 8 / 255, None, 24), (2, 5, 12 / 255, None, 24), (7, 7, 8 / 255, None, 16)])
def test_fast_default_is_not_above_autoattack_standard(trained_model, classes, seed, eps, wrap,
                                                       n):
    """(AutoAttack's cost is Square's 5,000 queries on every image it leaves robust: few
    images keep this test short.)"""
    if classes == 4:
        model, x, y = trained_model
    else:
        model, x, y = _train(classes, seed)
    x, y = x[:n], y[:n]
    if wrap is not None:
        model = wrap(model).eval()
    torch.manual_seed(0)
    robust, out = _default_robust(model, x, y, eps)
    x_aa = attack_from_config("autoattack", eps=eps)(model, x, y, TASK)
    with torch.no_grad():
        aa_robust = ~TASK.wrong(model(x), y) & ~TASK.wrong(model(x_aa), y)
    assert 0 < int(aa_robust.sum()) < int((~TASK.wrong(model(x), y)).sum())  # a real test
    assert int((robust & ~aa_robust).sum()) <= 1, (robust.sum(), aa_robust.sum())
    assert out.outside["fast"] == 0


def test_masked_images_go_to_square_and_only_there(trained_model):
    model, x, y = trained_model
    masked = Step(model).eval()
    x, y = x[:16], y[:16]
    eps = 32 / 255  # large enough for Square to fool some images in 1,000 queries
    white_only = attack_from_config("fast", eps=eps, square_queries=0)
    counted = PassCounter(masked)
    x_adv = white_only(counted, x, y, TASK)
    assert torch.equal(x_adv, x)  # zero gradients: no white-box stage even ran on them
    assert counted.backward_images == int((masked(x).argmax(1) == y).sum())  # routing only
    found = attack_from_config("fast", eps=eps, square_queries=1000)(masked, x, y, TASK)
    with torch.no_grad():
        assert (masked(found).argmax(1) != y).sum() > (masked(x).argmax(1) != y).sum()


def test_pass_counter_counts_pgd_exactly(trained_model):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    pgd = attack_from_config("pgd", eps=8 / 255, steps=5, early_stop=False)
    engine = RobustEvaluator("multiclass", 4, {"pgd": pgd})
    engine.update(model, x, y)
    cost = engine.cost()["pgd"]
    # 5 steps of one forward and one backward per image, then the adversarial forward
    assert cost["forward_passes"] == 6 * 16 and cost["backward_passes"] == 5 * 16
    assert cost["outside_threat_model"] == 0


@pytest.mark.parametrize("name,overrides", [("fast", {"targeted_iters": 5, "ce_iters": 5}),
                                            ("autoattack", {"components": ["apgd-ce"]})])
def test_third_party_attacks_run_in_fp32_under_autocast(trained_model, name, overrides):
    """Under bf16 autocast (trainer.precision=bf16-mixed) the result is the float32 one."""
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    attack = attack_from_config(name, eps=8 / 255, **overrides)
    plain = attack(model, x, y, TASK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = attack(model, x, y, TASK)
    assert cast.dtype == x.dtype and torch.equal(plain, cast)


def test_third_party_attacks_leave_the_global_rng_alone(trained_model):
    model, x, y = trained_model
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    attack_from_config("fast", eps=8 / 255, ce_iters=2, targeted_iters=2)(model, x[:8], y[:8])
    assert torch.equal(torch.rand(3), expected)


def test_fast_attack_options_are_checked():
    with pytest.raises(ValueError, match="ce_iters"):
        attack_from_config("fast", ce_iters=-1)
    stages = attack_from_config("fast").stages
    assert stages(7) == ["apgd-ce", "apgd-t"] and stages(3) == ["apgd-ce", "apgd-dlr"]
    assert stages(2) == ["apgd-ce", "apgd-ce-restart"]
