"""Defenses: the loss each returns for a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.attacks import attack_from_config
from lightning_modules.defenses import (
    TRADES,
    AdversarialTraining,
    MisclassificationAwareAT,
    MPAdvT,
    NoDefense,
)
from lightning_modules.defenses.divergences import kl_per_sample, true_class_prob
from lightning_modules.defenses.misclassification_aware import (
    boosted_ce,
    misclassification_aware_loss,
)
from lightning_modules.models.backbones import small_cnn

# MPAdvT levels are copies of this attack (conf/attack/pgd_train.yaml)
# MPAdvT's options as conf/defense/mpadvt.yaml sets them (levels aside)
MPADVT = dict(mode="per_sample", probs=None, clean_weight=0.0, p_adv=0.5, eps_min=0.0,
              eps_max=None, steps_max=None, step_size=1 / 255, name="mpadvt")
TRAIN_PGD = attack_from_config("pgd", eps=8 / 255, steps=7, model_mode="train")


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return small_cnn(3, width=4).train(), torch.rand(8, 3, 12, 12), torch.randint(0, 3, (8,))


def test_none_is_clean_cross_entropy(batch):
    model, x, y = batch
    out = NoDefense(name="none")(model, x, y, "multiclass")
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y), atol=1e-6)
    assert out.logits_adv is None


def test_pgd_at_trains_on_adversarial_examples(batch):
    model, x, y = batch
    attack = attack_from_config("pgd", eps=8 / 255, steps=2, model_mode="train")  # batch statistics: order-independent
    torch.manual_seed(1)
    out = AdversarialTraining(attacks={"pgd": attack}, weights=None, clean_weight=0.0, name="adversarial_training")(model, x, y, "multiclass")
    torch.manual_seed(1)
    x_adv = attack(model, x, y)
    expected = F.cross_entropy(model(x_adv), y)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.loss > F.cross_entropy(model(x), y)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_weights_and_clean_mix(batch):
    model, x, y = batch
    d = AdversarialTraining(attacks={"fgsm": attack_from_config("fgsm", eps=4 / 255, model_mode="train")}, weights={"fgsm": 0.5}, clean_weight=0.5, name="adversarial_training")
    out = d(model, x, y, "multiclass")
    x_adv = attack_from_config("fgsm", eps=4 / 255, model_mode="train")(model, x, y)
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(x_adv), y)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.logits_clean is not None and out.logits_adv is not None


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        AdversarialTraining(attacks={"pgd": attack_from_config("pgd", eps=0.1)}, weights={"fgsm": 1.0}, clean_weight=0.0, name="adversarial_training")
    with pytest.raises(ValueError, match="clean_weight"):
        AdversarialTraining(attacks={"pgd": attack_from_config("pgd", eps=0.1)}, weights=None, clean_weight=-1, name="adversarial_training")
    with pytest.raises(ValueError, match="empty"):
        AdversarialTraining(attacks={}, weights=None, clean_weight=0.0, name="adversarial_training")


# ------------------------------------------------------------------ published formulas (issue 4)


def test_kl_matches_torch_and_bernoulli_is_two_class_softmax():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    ref = F.kl_div(F.log_softmax(b, 1), F.softmax(a, 1), reduction="none").sum(1)
    assert torch.allclose(kl_per_sample(a, b, "multiclass"), ref, atol=1e-6)
    # a Bernoulli with logit z is a 2-class softmax over logits [0, z]
    za, zb = torch.randn(5, 3), torch.randn(5, 3)
    two = sum(kl_per_sample(torch.stack([torch.zeros(5), za[:, j]], 1),
                            torch.stack([torch.zeros(5), zb[:, j]], 1), "multiclass")
              for j in range(3))
    assert torch.allclose(kl_per_sample(za, zb, "multilabel"), two, atol=1e-5)
    assert torch.allclose(kl_per_sample(a, a, "multiclass"), torch.zeros(5), atol=1e-6)


def test_trades_beta_zero_is_clean_cross_entropy(batch):
    model, x, y = batch
    model.eval()
    out = TRADES(attack=attack_from_config("pgd", eps=8 / 255, steps=2, random_start="normal"), beta=0.0, name="trades")(
        model, x, y, "multiclass")
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y), atol=1e-6)


def test_trades_formula(batch):
    model, x, y = batch
    model.eval()  # BatchNorm on running stats: every forward is the same function
    attack = attack_from_config("pgd", eps=8 / 255, steps=3, random_start="normal")
    torch.manual_seed(3)
    out = TRADES(attack=attack, beta=6.0, name="trades")(model, x, y, "multiclass")
    torch.manual_seed(3)
    with torch.no_grad():
        target = model(x)
    x_adv = attack(model, x, y, loss_fn=lambda z, _y: kl_per_sample(target, z, "multiclass"))
    p_log = F.log_softmax(model(x), 1)
    q_log = F.log_softmax(model(x_adv), 1)
    kl = (p_log.exp() * (p_log - q_log)).sum(1).mean()
    expected = F.cross_entropy(model(x), y) + 6.0 * kl
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert kl > 0  # the inner maximisation moved the prediction
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_mart_hand_computed_example():
    # one sample, 3 classes, true class 0
    zc = torch.tensor([[2.0, 0.0, -1.0]])
    za = torch.tensor([[0.5, 1.0, -1.0]])
    y = torch.tensor([0])
    p, q = F.softmax(zc, 1)[0], F.softmax(za, 1)[0]
    bce = -torch.log(q[0]) - torch.log(1.0001 - q[1])  # class 1 is the top wrong class
    kl = (p * (p.log() - q.log())).sum()
    weight = 1.0000001 - p[0]  # MART's weight is 1 - p_y on the clean input
    expected = bce + 6.0 * kl * weight
    assert torch.allclose(boosted_ce(za, y, "multiclass"), bce.view(1), atol=1e-6)
    assert torch.allclose(misclassification_aware_loss(zc, za, y, 6.0, "multiclass"), expected, atol=1e-6)
    assert torch.allclose(true_class_prob(zc, y, "multiclass"), p[0].view(1))
    # a confidently right clean prediction switches the KL term off
    sure = torch.tensor([[30.0, 0.0, 0.0]])
    assert misclassification_aware_loss(sure, za, y, 6.0, "multiclass") == pytest.approx(
        boosted_ce(za, y, "multiclass").item(), abs=1e-4)


def test_maadvt_multilabel_per_finding_weights():
    zc = torch.tensor([[1.0, -2.0]])
    za = torch.tensor([[-0.5, 0.5]])
    y = torch.tensor([[1.0, 0.0]])
    pc, pa = torch.sigmoid(zc)[0], torch.sigmoid(za)[0]
    p_true = torch.stack([pc[0], 1 - pc[1]])
    q_true = torch.stack([pa[0], 1 - pa[1]])
    kl = pc * (pc / pa).log() + (1 - pc) * ((1 - pc) / (1 - pa)).log()
    bce = -q_true.log() - torch.log(1.0001 - (1 - q_true))
    expected = (bce + 2.0 * kl * (1.0000001 - p_true)).sum()
    assert torch.allclose(misclassification_aware_loss(zc, za, y, 2.0, "multilabel"), expected, atol=1e-5)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("make", [
    lambda: TRADES(attack=attack_from_config("pgd", eps=8 / 255, steps=2, random_start="normal"), beta=1.0, name="trades"),
    lambda: MisclassificationAwareAT(attack=attack_from_config("pgd", eps=8 / 255, steps=2), beta=6.0, name="mart"),
    lambda: MPAdvT(TRAIN_PGD, [{"eps": "2/255", "steps": 1}, {"eps": "8/255", "steps": 2}], **MPADVT),
    lambda: MPAdvT(TRAIN_PGD, [{"eps": "2/255", "steps": 1}, {"eps": "8/255", "steps": 2}], **{**MPADVT, "mode": "all_levels", "clean_weight": 0.3}),
    lambda: MPAdvT(TRAIN_PGD, [], **{**MPADVT, "mode": "released", "p_adv": 1.0, "steps_max": 2}),
    lambda: AdversarialTraining(attacks={"n": attack_from_config("n_fgsm", eps=8 / 255, model_mode="eval")}, weights=None, clean_weight=0.0, name="adversarial_training"),
])
def test_defense_loss_finite_and_differentiable(make, task):
    torch.manual_seed(0)
    model = small_cnn(3, width=4).train()
    x = torch.rand(8, 3, 12, 12)
    if task == "multiclass":
        y = torch.randint(0, 3, (8,))
    else:
        y = (torch.rand(8, 3) < 0.5).float()
    out = make()(model, x, y, task)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_mpadvt_draws_levels_as_configured():
    levels = [{"eps": "1/255", "steps": 1}, {"eps": "2/255", "steps": 1},
              {"eps": "4/255", "steps": 2}, {"eps": "8/255", "steps": 2}]
    g = torch.Generator().manual_seed(0)
    uniform = MPAdvT(TRAIN_PGD, levels, **MPADVT).draw_levels(40000, g)
    freq = torch.bincount(uniform, minlength=4).float() / 40000
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.01)
    skewed = MPAdvT(TRAIN_PGD, levels, **{**MPADVT, "probs": [0, 3, 1, 0]}).draw_levels(40000, g)
    freq = torch.bincount(skewed, minlength=4).float() / 40000
    assert freq[0] == 0 and freq[3] == 0 and abs(freq[1] - 0.75) < 0.01
    only = MPAdvT(TRAIN_PGD, levels, **{**MPADVT, "probs": [0, 0, 1, 0]})
    assert [a.eps for a in only.attacks.values()] == pytest.approx(
        [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    assert [a.steps for a in only.attacks.values()] == [1, 1, 2, 2]


def test_mpadvt_per_sample_perturbation_matches_drawn_level(monkeypatch):
    torch.manual_seed(0)
    model = small_cnn(3, width=4).eval()
    x, y = torch.rand(16, 3, 12, 12) * 0.5 + 0.25, torch.randint(0, 3, (16,))
    d = MPAdvT(TRAIN_PGD, [{"eps": "1/255", "steps": 2}, {"eps": "8/255", "steps": 2}], **MPADVT)
    draw = torch.tensor([0, 1] * 8)
    monkeypatch.setattr(d, "draw_levels", lambda n, generator=None: draw)
    orig_forward = model.forward
    calls = []
    model.forward = lambda inp: (calls.append(inp), orig_forward(inp))[1]
    d(model, x, y, "multiclass")
    x_adv = calls[-1]  # the training forward gets the assembled adversarial batch
    linf = (x_adv - x).abs().flatten(1).max(1).values
    assert (linf[draw == 0] <= 1 / 255 + 1e-6).all()
    assert (linf[draw == 1] <= 8 / 255 + 1e-6).all() and (linf[draw == 1] > 2 / 255).all()


def test_mpadvt_bad_config():
    with pytest.raises(ValueError, match="levels"):
        MPAdvT(TRAIN_PGD, [], **MPADVT)
    with pytest.raises(ValueError, match="levels\\[0\\]"):
        MPAdvT(TRAIN_PGD, [{"eps": 0.1}], **MPADVT)
    with pytest.raises(ValueError, match="mode"):
        MPAdvT(TRAIN_PGD, [{"eps": 0.1, "steps": 1}], **{**MPADVT, "mode": "some"})
    with pytest.raises(ValueError, match="probs"):
        MPAdvT(TRAIN_PGD, [{"eps": 0.1, "steps": 1}], **{**MPADVT, "probs": [0.5, 0.5]})


def test_n_fgsm_not_projected_but_in_pixel_range():
    torch.manual_seed(0)
    model = small_cnn(3, width=4).eval()
    x, y = torch.rand(32, 3, 12, 12) * 0.6 + 0.2, torch.randint(0, 3, (32,))
    eps = 8 / 255
    x_adv = attack_from_config("n_fgsm", eps=eps, model_mode="eval")(model, x, y)
    delta = (x_adv - x).abs()
    assert delta.max() <= 3 * eps + 1e-6 and delta.max() > eps  # noise 2 eps + step eps
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_fast_at_step_and_eps_warmup_scale():
    rs = attack_from_config("pgd", eps=8 / 255, steps=1, step_size_rel=1.25)
    assert rs.step_size == pytest.approx(1.25 * 8 / 255)
    half = rs.with_eps(rs.eps * 0.5)  # what a warm-up factor of 0.5 runs
    assert half.eps == pytest.approx(4 / 255) and half.step_size == pytest.approx(1.25 * 4 / 255)
    torch.manual_seed(0)
    model = small_cnn(3, width=4).eval()
    x, y = torch.rand(8, 3, 12, 12) * 0.5 + 0.25, torch.randint(0, 3, (8,))
    # the warm-up is a value passed to the call: the defense's attack itself never changes
    d = AdversarialTraining(attacks={"rs": rs}, weights=None, clean_weight=0.0, name="adversarial_training")
    calls = []
    orig_forward = model.forward
    model.forward = lambda inp: (calls.append(inp), orig_forward(inp))[1]
    d(model, x, y, "multiclass", eps_scale=0.5)
    assert (calls[-1] - x).abs().max() <= 4 / 255 + 1e-6  # the training forward's input
    assert (calls[-1] - x).abs().max() > 3 / 255
    assert rs.eps == pytest.approx(8 / 255)
    assert (rs(model, x, y, eps_scale=0.25) - x).abs().max() <= 2 / 255 + 1e-6
    with pytest.raises(ValueError, match="eps_scale"):
        rs(model, x, y, eps_scale=1.5)
    fixed = attack_from_config("pgd", eps=8 / 255, steps=4, step_size="2/255")
    assert fixed.with_eps(2 / 255).step_size == pytest.approx(0.5 / 255)


def test_mpadvt_levels_need_pgd():
    with pytest.raises(TypeError, match="PGD"):
        MPAdvT(attack_from_config("fgsm", eps=8 / 255), [{"eps": 0.1, "steps": 1}], **MPADVT)


def _released(**kw):
    return MPAdvT(attack=TRAIN_PGD.replace(random_start=False), levels=[],
                  **{**MPADVT, "mode": "released", "eps_min": "1/255", "eps_max": "8/255",
                     "steps_max": 5, **kw})


def test_mpadvt_released_draws():
    """mode=released: adversarial with probability p_adv, eps ~ U[eps_min, eps_max],
    steps ~ U{1..steps_max}."""
    g = torch.Generator().manual_seed(0)
    d = _released(p_adv=0.3)
    draws = [d.draw_batch(g) for _ in range(20000)]
    adv = torch.tensor([a for a, _, _ in draws], dtype=torch.float)
    eps = torch.tensor([e for _, e, _ in draws]) * 255
    steps = torch.tensor([s for _, _, s in draws])
    assert abs(adv.mean() - 0.3) < 0.015
    assert eps.min() >= 1 and eps.max() <= 8 and abs(eps.mean() - 4.5) < 0.05
    assert abs(((eps - 1) / 7).var() - 1 / 12) < 0.005  # uniform
    freq = torch.bincount(steps, minlength=6).float() / len(steps)
    assert freq[0] == 0 and torch.allclose(freq[1:], torch.full((5,), 0.2), atol=0.015)
    assert all(not a for a, _, _ in (_released(p_adv=0.0).draw_batch(g) for _ in range(200)))


def test_mpadvt_released_batch_is_pgd_with_the_drawn_radius_and_steps(monkeypatch):
    torch.manual_seed(0)
    model = small_cnn(3, width=4).eval()
    x, y = torch.rand(16, 3, 12, 12) * 0.5 + 0.25, torch.randint(0, 3, (16,))
    d = _released()
    orig_forward = model.forward
    calls = []
    model.forward = lambda inp: (calls.append(inp), orig_forward(inp))[1]
    monkeypatch.setattr(d, "draw_batch", lambda generator=None: (True, 8 / 255, 3))
    out = d(model, x, y, "multiclass")
    assert len(calls) == 3 + 1 and out.logits_adv is not None and out.logits_clean is None
    linf = (calls[-1] - x).abs().flatten(1).max(1).values
    assert torch.allclose(linf, torch.full_like(linf, 3 / 255), atol=1e-6)  # 3 steps of 1/255
    monkeypatch.setattr(d, "draw_batch", lambda generator=None: (True, 2 / 255, 5))
    calls.clear()
    d(model, x, y, "multiclass")
    assert len(calls) == 6
    assert ((calls[-1] - x).abs().max() <= 2 / 255 + 1e-6)  # projected to the drawn radius
    monkeypatch.setattr(d, "draw_batch", lambda generator=None: (False, 8 / 255, 5))
    calls.clear()
    out = d(model, x, y, "multiclass")
    assert len(calls) == 1 and calls[0] is x and out.logits_adv is None
    assert torch.allclose(out.loss, F.cross_entropy(orig_forward(x), y))


def test_mpadvt_released_bad_config():
    with pytest.raises(ValueError, match="p_adv"):
        _released(p_adv=1.5)
    with pytest.raises(ValueError, match="eps_min"):
        _released(eps_min="9/255")
    with pytest.raises(ValueError, match="steps_max"):
        _released(steps_max=0)
