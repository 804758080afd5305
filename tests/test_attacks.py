"""Attacks against their definitions."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.attacks import PGD, attack_from_config, attack_mode, parse_eps
from lightning_modules.core.tasks import bce_per_sample, cross_entropy_per_sample
from lightning_modules.models.backbones import small_cnn
from tests.conftest import attack_kwargs

EPS = 8 / 255


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _loss(model, x, y, fn=cross_entropy_per_sample):
    with torch.no_grad():
        return fn(model(x), y).mean().item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("make", [lambda n, e: attack_from_config("fgsm", eps=e, norm=n),
                                  lambda n, e: attack_from_config("pgd", eps=e, steps=5, norm=n),
                                  lambda n, e: attack_from_config("pgd", eps=e, steps=3, norm=n, restarts=2)])
def test_inside_ball_and_pixel_range(trained_model, norm, make):
    model, x, y = trained_model
    eps = EPS if norm == "linf" else 0.5
    x_adv = make(norm, eps)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    # the attack moved the input and raised the loss
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert size.median() > eps / 2
    assert _loss(model, x_adv, y) > _loss(model, x, y)


@pytest.mark.parametrize("atk", [attack_from_config("fgsm", eps=0), attack_from_config("pgd", eps=0, steps=3), attack_from_config("pgd", eps="0", steps=2, norm="l2")])
def test_eps_zero_is_identity(trained_model, atk):
    model, x, y = trained_model
    assert torch.equal(atk(model, x, y), x)


def test_pgd_at_least_as_strong_as_fgsm(trained_model):
    model, x, y = trained_model
    torch.manual_seed(0)
    acc_clean = _acc(model, x, y)
    acc_fgsm = _acc(model, attack_from_config("fgsm", eps=EPS)(model, x, y), y)
    acc_pgd = _acc(model, attack_from_config("pgd", eps=EPS, steps=10)(model, x, y), y)
    assert acc_pgd <= acc_fgsm <= acc_clean
    assert acc_pgd < acc_clean - 0.2, "PGD at 8/255 should hurt an undefended model"


def test_restarts_never_weaker(trained_model):
    model, x, y = trained_model
    torch.manual_seed(1)
    one = attack_from_config("pgd", eps=2 / 255, steps=3)
    torch.manual_seed(1)
    x1 = one(model, x, y)
    torch.manual_seed(1)
    x3 = attack_from_config("pgd", eps=2 / 255, steps=3, restarts=3)(model, x, y)
    # with the same seed the first restart equals the single run; later ones only replace it
    with torch.no_grad():
        l1 = cross_entropy_per_sample(model(x1), y)
        l3 = cross_entropy_per_sample(model(x3), y)
        wrong1 = model(x1).argmax(1) != y
        wrong3 = model(x3).argmax(1) != y
    assert (wrong3 | ~wrong1).all(), "a sample fooled by one run must stay fooled"
    keep = wrong1 == wrong3
    assert (l3[keep] >= l1[keep] - 1e-5).all()


def test_parameter_grads_untouched(trained_model):
    model, x, y = trained_model
    for p in model.parameters():
        assert p.grad is None
    attack_from_config("pgd", eps=EPS, steps=2)(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    # existing grads are left exactly as they were
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    attack_from_config("fgsm", eps=EPS)(model, x, y)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("start_training", [True, False])
def test_mode_and_batchnorm_restored(mode, start_training):
    torch.manual_seed(0)
    model = small_cnn(3, width=4, dropout=0.2)
    model.train(start_training)
    model.net.head[1].eval()  # a submodule in a mode different from its parent
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items()})
    x = torch.rand(8, 3, 12, 12)
    y = torch.randint(0, 3, (8,))
    attack_from_config("pgd", eps=EPS, steps=3, model_mode=mode)(model, x, y)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed during the attack"


def test_mode_restored_when_attack_raises():
    model = small_cnn(3, width=4)
    model.train()

    def bad_loss(logits, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attack_from_config("pgd", eps=EPS, steps=2)(model, torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long),
                          loss_fn=bad_loss)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_attack_mode_eval_switches_and_freezes():
    model = small_cnn(3, width=4).train()
    with attack_mode(model, "eval"):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="mode"):
        with attack_mode(model, "nope"):
            pass


def test_multilabel_bce_path():
    from datamodules.synthetic import make_synthetic

    torch.manual_seed(0)
    x, y = make_synthetic(256, 5, image_size=16, task="multilabel", signal_amplitude=0.15)
    assert y.shape == (256, 5) and set(y.unique().tolist()) <= {0.0, 1.0}
    model = small_cnn(5, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for i in range(0, 256, 64):
            loss = bce_per_sample(model(x[i:i + 64]), y[i:i + 64]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x_adv = attack_from_config("pgd", eps=EPS, steps=5)(model, x, y, "multilabel")
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert _loss(model, x_adv, y, bce_per_sample) > _loss(model, x, y, bce_per_sample) + 0.05
    torch.manual_seed(0)
    x_r = attack_from_config("pgd", eps=EPS, steps=2, restarts=2)(model, x, y, "multilabel")
    assert x_r.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_works_under_autocast(trained_model, dtype):
    """bf16-mixed and 16-mixed: the input gradient does not underflow (fp16 losses are scaled),
    the perturbation is real and the attack changes predictions of a trained model about as
    much as in fp32."""
    model, x, y = trained_model
    torch.manual_seed(0)
    ref = _acc(model, attack_from_config("pgd", eps=EPS, steps=10)(model, x, y), y)  # fp32
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype):
        x_adv = attack_from_config("pgd", eps=EPS, steps=10)(model, x, y)
    assert x_adv.dtype == torch.float32
    delta = (x_adv - x).abs()
    assert delta.max() <= EPS + 1e-6
    assert (delta > 0).float().mean() > 0.5  # the gradient was not lost: most pixels moved
    acc = _acc(model, x_adv, y)
    assert acc < _acc(model, x, y) - 0.05 and acc <= ref + 0.05, (acc, ref)


def test_step_size_default_and_with_eps():
    atk = attack_from_config("pgd", eps="8/255", steps=10)
    assert atk.eps == pytest.approx(8 / 255)
    assert atk.step_size == pytest.approx(2.5 * 8 / 255 / 10)
    fixed = attack_from_config("pgd", eps=8 / 255, steps=10, step_size="2/255").with_eps(4 / 255)
    assert fixed.eps == pytest.approx(4 / 255) and fixed.step_size == pytest.approx(1 / 255)
    assert attack_from_config("fgsm", eps=0.1).with_eps(0.2).step_size == pytest.approx(0.2)


@pytest.mark.parametrize("bad, match", [
    (dict(eps=-0.1), "eps"), (dict(eps="-1/255"), "eps"), (dict(eps="abc"), "eps"),
    (dict(steps=0), "steps"), (dict(restarts=0), "restarts"), (dict(norm="l7"), "norm"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        attack_from_config("pgd", **{"eps": 0.1, **bad})


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(0.5) == 0.5
    assert parse_eps("0.25") == 0.25
    with pytest.raises(ValueError):
        parse_eps("__import__('os')")
    with pytest.raises(ValueError):
        parse_eps(True)


def test_train_mode_attack_after_a_training_forward_keeps_backward_valid():
    """A graph built before a train-mode attack must still backpropagate afterwards
    (BatchNorm buffers saved for backward are never written in place)."""
    torch.manual_seed(0)
    model = small_cnn(3, width=4).train()
    x, y = torch.rand(8, 3, 12, 12), torch.randint(0, 3, (8,))
    loss = cross_entropy_per_sample(model(x), y).mean()
    running = model.net.features[1].running_mean.clone()
    attack_from_config("pgd", eps=EPS, steps=2, model_mode="train")(model, x, y)
    assert torch.equal(model.net.features[1].running_mean, running)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_early_stop_never_weaker_and_stays_in_ball(trained_model, channels_last):
    model, x, y = trained_model
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    eps = 6 / 255
    torch.manual_seed(3)
    plain = attack_from_config("pgd", eps=eps, steps=10)(model, x, y)
    torch.manual_seed(3)  # same random start
    early = attack_from_config("pgd", eps=eps, steps=10, early_stop=True)(model, x, y)
    assert (early - x).abs().max() <= eps + 1e-6 and early.min() >= 0 and early.max() <= 1
    with torch.no_grad():
        wrong_plain = model(plain).argmax(1) != y
        wrong_early = model(early).argmax(1) != y
    assert 0 < wrong_plain.sum() < len(y) and (wrong_early | ~wrong_plain).all()
    # samples never misclassified follow the plain trajectory to the end
    untouched = ~wrong_early
    assert torch.allclose(early[untouched], plain[untouched], atol=1e-5)
    assert attack_from_config("pgd", eps=eps, early_stop=True).with_eps(1 / 255).early_stop


def test_early_stop_rules():
    with pytest.raises(ValueError, match="model_mode='eval'"):
        attack_from_config("pgd", eps=EPS, early_stop=True, model_mode="train")
    model = small_cnn(3, width=4).eval()
    x, y = torch.rand(6, 3, 8, 8), (torch.rand(6, 3) < 0.5).float()
    torch.manual_seed(0)
    a = attack_from_config("pgd", eps=EPS, steps=3, early_stop=True)(model, x, y, "multilabel")
    torch.manual_seed(0)
    b = attack_from_config("pgd", eps=EPS, steps=3)(model, x, y, "multilabel")
    assert torch.equal(a, b)  # multi-label: early stop does not apply


def test_attacks_are_immutable():
    atk = attack_from_config("pgd", eps=EPS, steps=3)
    with pytest.raises(AttributeError, match="immutable"):
        atk.steps = 5
    assert atk.with_eps(2 / 255).eps == pytest.approx(2 / 255) and atk.eps == pytest.approx(EPS)
    assert atk.replace(steps=7).steps == 7 and atk.steps == 3

    class MyPGD(PGD):  # a subclass without an __init__ of its own is frozen too
        pass

    mine = MyPGD(**attack_kwargs("pgd", eps=EPS))
    with pytest.raises(AttributeError):
        mine.steps = 99
    with pytest.raises(AttributeError):
        attack_from_config("fgsm", eps=EPS).threat = None


def test_margin_loss_formula():
    from lightning_modules.attacks.pgd import margin_loss

    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    assert torch.allclose(margin_loss(logits, torch.tensor([0, 0])), torch.tensor([-1.0, 3.0]))


@pytest.mark.parametrize("kw", [{"loss": "margin"}, {"targeted": "random"},
                                {"targeted": "least_likely", "loss": "margin"}])
def test_margin_and_targeted_pgd_stay_in_the_ball_and_hurt(trained_model, kw):
    model, x, y = trained_model
    atk = attack_from_config("pgd", eps=8 / 255, steps=20, **kw)
    torch.manual_seed(0)
    x_adv = atk(model, x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        adv = (model(x_adv).argmax(1) == y).float().mean()
    assert adv < clean - 0.1
    assert atk.describe()[next(iter(kw))] == next(iter(kw.values()))
    assert attack_from_config("pgd", **kw).replace(eps=0.1).describe() == attack_from_config("pgd", eps=0.1, **kw).describe()


@pytest.mark.parametrize("how", ["random", "least_likely"])
def test_targeted_pgd_hits_its_target_more_often_than_chance(trained_model, how):
    """4 classes: a random wrong class is hit with probability 1/3 by chance; the targeted
    attack hits the target it drew far more often, with or without early stop."""
    from lightning_modules.attacks.pgd import draw_targets

    model, x, y = trained_model
    for early_stop in (False, True):
        torch.manual_seed(1)
        with torch.no_grad():
            target = draw_targets(model(x), y, how)  # the draw the attack makes, same seed
        assert (target != y).float().mean() > 0.9
        torch.manual_seed(1)
        x_adv = attack_from_config("pgd", eps=16 / 255, steps=20, targeted=how, early_stop=early_stop)(model, x, y)
        with torch.no_grad():
            hit = (model(x_adv).argmax(1) == target).float().mean().item()
        assert hit > 0.6, (how, early_stop, hit)


def test_margin_and_targeted_refuse_multilabel():
    model = torch.nn.Linear(3 * 8 * 8, 4)
    net = torch.nn.Sequential(torch.nn.Flatten(), model)
    with pytest.raises(ValueError, match="single-label"):
        attack_from_config("pgd", eps=0.1, steps=1, loss="margin")(net, torch.rand(2, 3, 8, 8), torch.ones(2, 4),
                                             "multilabel")
    with pytest.raises(ValueError, match="targeted"):
        attack_from_config("pgd", targeted="closest")


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_fooling_rate_is_the_share_of_changed_predictions(trained_model, task):
    """Every attack's report has ``fooling_rate``: the share of images whose prediction the
    attack changed (argmax; multi-label: any finding flipped at probability 0.5)."""
    from lightning_modules.evaluation.engine import RobustEvaluator

    model, x, y = trained_model
    if task == "multilabel":
        y = torch.nn.functional.one_hot(y, 4).float()
    evaluator = RobustEvaluator(task, 4, {"pgd": attack_from_config("pgd", eps=8 / 255, steps=5)})
    torch.manual_seed(0)
    out = evaluator.update(model, x, y)
    result = evaluator.compute()
    clean, adv = out.clean, out.adv["pgd"]
    if task == "multiclass":
        expected = (clean.argmax(1) != adv.argmax(1)).float().mean()
    else:
        expected = ((clean > 0) != (adv > 0)).any(dim=1).float().mean()
    assert result["pgd"]["fooling_rate"] == pytest.approx(float(expected))
    assert 0 < result["pgd"]["fooling_rate"] <= 1 and "fooling_rate" not in result["clean"]
