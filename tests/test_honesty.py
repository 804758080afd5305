"""Each honesty check passes on an honest model and fires on a model or attack built to trip
it: a softmax output layer, a non-differentiable step (on every image, or on half of them), a
random model, a constant binary model, an attack that leaves its ball, a one-step PGD labelled
PGD-20; and on report rows that break monotonicity, the worst case (of any group) or the
agreement of PGD with AutoAttack and the fast attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.attacks import PGD, attack_from_config
from lightning_modules.core.tasks import Task
from lightning_modules.evaluation.engine import RobustEvaluator
from lightning_modules.evaluation.honesty import (
    attack_kind,
    failed,
    model_checks,
    more_steps_check,
    probe_checks,
    report_checks,
    stronger_pgd,
)
from tests.conftest import attack_kwargs

TASK = Task("multiclass")


def _names(checks):
    return {c.check for c in failed(checks)}


def test_honest_model_passes(trained_model):
    model, x, y = trained_model
    assert not failed(model_checks(model, x[:32], y[:32], TASK))


class Softmax(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(-1)


class Step(nn.Module):  # rounds the input: zero gradient almost everywhere
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class Random(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x))


class HalfStep(nn.Module):  # every other image of the batch through the rounding step
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        odd = (torch.arange(x.shape[0], device=x.device) % 2 == 1).view(-1, 1, 1, 1)
        return self.net(torch.where(odd, torch.round(x * 4) / 4, x))


@pytest.mark.parametrize("wrap,fires", [(Softmax, "outputs_are_logits"),
                                        (Step, "gradients_nonzero_finite"),
                                        (HalfStep, "gradients_nonzero_finite"),
                                        (Random, "deterministic")])
def test_each_model_check_fires_on_a_model_built_to_trip_it(trained_model, wrap, fires):
    model, x, y = trained_model
    assert fires in _names(model_checks(wrap(model), x[:32], y[:32], TASK))


def test_saturated_logits_pass_the_gradient_check_on_the_margin(trained_model):
    """A saturated softmax zeroes the cross-entropy gradient but not the margin's: the check
    reads the margin (what the attacks use) and states the saturated share."""
    model, x, y = trained_model
    check = next(c for c in model_checks(Saturated(model), x[:32], y[:32], TASK)
                 if c.check == "gradients_nonzero_finite")
    assert check.passed and "saturated) for 0%" not in check.detail


def _row(attack, eps, acc, group=None):
    return {"attack": attack, "eps": eps, "eps_str": f"{round(eps * 255)}/255", "acc": acc,
            **({"group": group} if group else {})}


def test_report_checks_fire_on_bad_rows():
    clean = {"acc": 0.9}
    good = [_row("pgd", 0, 0.9), _row("pgd", 2 / 255, 0.5), _row("pgd", 8 / 255, 0.2),
            _row("fgsm", 2 / 255, 0.6), _row("worst", 2 / 255, 0.45)]
    assert not failed(report_checks(clean, good, n_images=100))
    bad = [_row("pgd", 0, 0.85), _row("pgd", 2 / 255, 0.3), _row("pgd", 8 / 255, 0.4),
           _row("fgsm", 2 / 255, 0.25), _row("worst", 2 / 255, 0.28)]
    assert _names(report_checks(clean, bad, n_images=100)) == {
        "monotone_in_eps", "worst_case_not_above_attacks"}
    # a rise of one image in 100 is noise of a random start, not a flag
    noisy = [_row("pgd", 2 / 255, 0.30), _row("pgd", 4 / 255, 0.31)]
    assert not failed(report_checks(clean, noisy, n_images=100))


def test_worst_case_check_reads_every_group():
    """``worst-linf`` / ``worst-l2`` rows (attacks of two norms) are each checked against their
    own group, not skipped for their name."""
    rows = [_row("pgd", 2 / 255, 0.5, "worst-linf"), _row("worst-linf", 2 / 255, 0.45,
                                                           "worst-linf"),
            {**_row("pgd_l2", 0.5, 0.3, "worst-l2"), "norm": "l2"},
            {**_row("worst-l2", 0.5, 0.35, "worst-l2"), "norm": "l2"}]
    checks = report_checks({"acc": 0.9}, rows, n_images=100)
    bad = next(c for c in checks if c.check == "worst_case_not_above_attacks")
    assert not bad.passed and "worst-l2" in bad.detail and "worst-linf" not in bad.detail
    rows[3]["acc"] = 0.3
    assert not failed(report_checks({"acc": 0.9}, rows, n_images=100))


def test_attack_kind_tells_the_reference_pgd_from_its_variants():
    describe = attack_from_config("pgd_eval").describe()
    assert attack_kind(describe) == "pgd"
    assert attack_kind(attack_from_config("pgd_cw").describe()) == "pgd-margin"
    assert attack_kind(attack_from_config("pgd_targeted").describe()) == "pgd-random"
    assert attack_kind(attack_from_config("fast").describe()) == "fast"


def test_agreement_compares_autoattack_with_the_reference_pgd_only():
    """In evaluation=full every PGD is named ``pgd``: a margin PGD far below AutoAttack is no
    disagreement of PGD with AutoAttack."""
    kinds = {"pgd": "pgd", "pgd_cw": "pgd-margin", "aa": "autoattack"}
    rows = [_row("pgd", 2 / 255, 0.50), _row("pgd_cw", 2 / 255, 0.30), _row("aa", 2 / 255, 0.49)]
    assert not failed(report_checks({"acc": 0.9}, rows, n_images=100, kinds=kinds))


def test_agreement_under_the_cascade_tests_one_direction_and_says_so():
    kinds = {"pgd": "pgd", "fast": "fast"}
    far = [_row("pgd", 2 / 255, 0.50), _row("fast", 2 / 255, 0.30)]  # PGD overestimates
    checks = report_checks({"acc": 0.9}, far, n_images=100, kinds=kinds, cascade=True)
    check = next(c for c in checks if c.check == "pgd_and_fast_agree")
    assert not check.passed and "only PGD above it" in check.detail
    close = [_row("pgd", 2 / 255, 0.50), _row("fast", 2 / 255, 0.49)]
    check = next(c for c in report_checks({"acc": 0.9}, close, n_images=100, kinds=kinds,
                                          cascade=True) if c.check == "pgd_and_fast_agree")
    assert check.passed and "only PGD above it" in check.detail


class Overshoots(PGD):  # PGD without the projection: twice the radius
    def _perturb(self, model, x, y, task, loss_fn):
        return (x + 2 * self.eps * torch.randn_like(x).sign()).clamp(0, 1)


def test_threat_model_check_fires_on_an_attack_that_leaves_its_ball(trained_model):
    model, x, y = trained_model
    honest = attack_from_config("pgd_eval", eps=8 / 255, steps=3)
    bad = Overshoots(**attack_kwargs("pgd_eval", eps=8 / 255, steps=3))
    engine = RobustEvaluator("multiclass", 4, {"pgd": honest, "bad": bad},
                             worst_case={"worst": ["pgd", "bad"]}, cascade=True)
    engine.update(model, x[:32], y[:32])
    cost = engine.cost()
    assert cost["pgd"]["outside_threat_model"] == 0 and cost["bad"]["outside_threat_model"] > 0
    rows = [_row("pgd", 8 / 255, 0.5)]
    check = next(c for c in report_checks({"acc": 0.9}, rows, 32, cost=cost)
                 if c.check == "attacks_stay_in_threat_model")
    assert not check.passed and "bad" in check.detail
    check = next(c for c in report_checks({"acc": 0.9}, rows, 32, cost={"pgd": cost["pgd"]})
                 if c.check == "attacks_stay_in_threat_model")
    assert check.passed


def test_pgd_and_autoattack_agree_check():
    clean = {"acc": 0.9}
    kinds = {"pgd": "pgd", "aa": "autoattack", "fgsm": "fgsm"}
    close = [_row("pgd", 2 / 255, 0.50), _row("aa", 2 / 255, 0.48), _row("fgsm", 2 / 255, 0.6)]
    checks = report_checks(clean, close, n_images=100, kinds=kinds)
    assert "pgd_and_autoattack_agree" in {c.check for c in checks} and not failed(checks)
    far = [_row("pgd", 2 / 255, 0.50), _row("aa", 2 / 255, 0.30)]  # PGD overestimates
    above = [_row("pgd", 2 / 255, 0.50), _row("aa", 2 / 255, 0.55)]  # AA weaker than PGD
    for rows in (far, above):
        assert _names(report_checks(clean, rows, n_images=100, kinds=kinds)) == {
            "pgd_and_autoattack_agree"}
    assert "pgd_and_autoattack_agree" not in {
        c.check for c in report_checks(clean, far, n_images=100)}  # no AutoAttack row: no check
    # AutoAttack's extra finds in small classes show in balanced accuracy, not in accuracy
    small = [{**_row("pgd", 2 / 255, 0.35), "bal_acc": 0.39},
             {**_row("aa", 2 / 255, 0.34), "bal_acc": 0.31}]
    checks = report_checks({"acc": 0.9, "bal_acc": 0.8}, small, n_images=300,
                           metrics=("acc", "bal_acc"), kinds=kinds)
    assert _names(checks) == {"pgd_and_autoattack_agree"}
    assert "bal_acc" in next(c.detail for c in checks if not c.passed)


def test_worst_case_bounds_only_per_sample_metrics():
    # AUROC ranks images: a per-sample worst case of two attacks can rank better than either
    rows = [{**_row("pgd", 2 / 255, 0.2), "auroc": 0.04}, {**_row("worst", 2 / 255, 0.2),
                                                            "auroc": 0.55}]
    clean = {"acc": 0.9, "auroc": 0.9}
    assert not failed(report_checks(clean, rows, 100, metrics=("acc", "auroc")))
    assert "worst_case_not_above_attacks" not in {  # multi-label: no bounded metric
        c.check for c in report_checks(clean, rows, 100, metrics=("acc", "auroc"), bounded=())}


def test_checks_with_nothing_to_test_are_left_out():
    names = {c.check for c in report_checks({"acc": 0.9}, [_row("pgd", 2 / 255, 0.5)], 100)}
    assert not names & {"monotone_in_eps", "worst_case_not_above_attacks",
                        "attacks_stay_in_threat_model"}


# ----------------------------------------------------------------- attack probes (one batch)
PGD_REF = attack_from_config("pgd", eps=16 / 255, steps=10, model_mode="eval", early_stop=True)


def test_probes_pass_on_an_honest_model_and_attack(trained_model):
    model, x, y = trained_model
    checks = probe_checks(model, x, y, TASK, 4, PGD_REF, square_queries=100, max_images=32)
    assert {c.check for c in checks} == {"large_eps_breaks_the_model",
                                         "square_not_above_white_box"}
    assert not failed(checks), checks


class NoOpPGD(PGD):  # an attack that silently does nothing
    def _perturb(self, model, x, y, task, loss_fn):
        return x


class Saturated(nn.Module):  # logits x 1e4: softmax saturates, the CE gradient underflows
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1e4


@pytest.mark.parametrize("model_wrap,attack_cls,fires", [
    (None, NoOpPGD, {"large_eps_breaks_the_model", "square_not_above_white_box"}),
    (Saturated, PGD, {"square_not_above_white_box"}),
])
def test_each_probe_fires_when_built_to_trip_it(trained_model, model_wrap, attack_cls, fires):
    model, x, y = trained_model
    if model_wrap is not None:
        model = model_wrap(model)
    # at 32/255 Square (1000 queries) fools most of these 16 px images; PGD-10 fools all
    pgd = attack_cls(**attack_kwargs("pgd", eps=32 / 255, steps=10, early_stop=True))
    checks = probe_checks(model, x, y, TASK, 4, pgd, square_queries=1000, max_images=32)
    assert fires <= _names(checks), checks


class ConstantBinary(nn.Module):  # always class 0, whatever the image: "robust" at any eps
    def forward(self, x):
        return torch.stack([1 + 0 * x.mean((1, 2, 3)), 0 * x.mean((1, 2, 3))], dim=1)


def test_large_eps_check_fires_on_a_binary_model_holding_half_its_images():
    """Chance (0.5) would pass a binary model that keeps half its images at L-inf 0.5; any
    sound model is broken there."""
    x = torch.rand(32, 3, 16, 16)
    y = (torch.arange(32) % 2).long()  # half are class 0: accuracy 0.5 at every eps
    pgd = attack_from_config("pgd_eval", eps=8 / 255, steps=5)
    check = next(c for c in probe_checks(ConstantBinary(), x, y, TASK, 2, pgd,
                                         square_queries=None) if c.check ==
                 "large_eps_breaks_the_model")
    assert not check.passed and "0.5000" in check.detail


def _reported(model, attack, x, y):
    x_adv = attack(model, x, y, TASK)
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


def test_more_steps_fires_on_a_one_step_pgd_labelled_pgd20_and_passes_the_default(
        trained_model):
    """The stronger PGD (5x the steps, more restarts, CE and margin) must not fool more than
    one image the reported attacks counted robust: it does after a one-step PGD that calls
    itself PGD-20, and not after the default evaluation (PGD-20, then the fast attack)."""
    model, x, y = trained_model
    x, y = x[:64], y[:64]
    eps = 6 / 255
    weak = PGD(**attack_kwargs("pgd_eval", eps=eps, steps=1, step_size=eps / 8,
                               random_start=False))
    torch.manual_seed(0)
    robust = _reported(model, weak, x, y)
    stronger = stronger_pgd(attack_from_config("pgd_eval", eps=eps), TASK)
    assert set(stronger) == {"pgd_strong", "pgd_strong_cw"}
    check, strong_robust = more_steps_check(model, x, y, TASK, robust, "pgd (PGD-20)", stronger)
    assert not check.passed and "upper bound" in check.detail, check
    assert int((robust & ~strong_robust).sum()) > 1
    torch.manual_seed(0)
    robust = _reported(model, attack_from_config("pgd_eval", eps=eps), x, y) & \
        _reported(model, attack_from_config("fast", eps=eps), x, y)
    check, _ = more_steps_check(model, x, y, TASK, robust, "pgd + fast", stronger)
    assert check.passed, check


def test_more_steps_second_draw_forgives_noise_but_not_a_weak_attack(trained_model):
    """Images the stronger PGD fools get a second draw of the reported attacks: those it then
    fools are random-start noise and do not count; those it still misses do. A one-step PGD
    labelled PGD-20 stays flagged through its own second draw."""
    model, x, y = trained_model
    x, y = x[:32], y[:32]
    eps = 6 / 255
    stronger = stronger_pgd(attack_from_config("pgd_eval", eps=eps), TASK)
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    # reported: every clean-right image robust (an attack that did nothing)
    seen = []

    def fooled_all(mask):
        seen.append(int(mask.sum()))
        return torch.zeros(int(mask.sum()), dtype=torch.bool)

    check, strong_robust = more_steps_check(model, x, y, TASK, clean_ok, "noisy", stronger,
                                            redraw=fooled_all)
    flagged = int((clean_ok & ~strong_robust).sum())
    assert flagged > 1 and seen == [flagged]
    assert check.passed and "second draw" in check.detail, check
    check, _ = more_steps_check(model, x, y, TASK, clean_ok, "noisy", stronger,
                                redraw=lambda mask: torch.ones(int(mask.sum()), dtype=torch.bool))
    assert not check.passed and f"fooled {flagged} image(s)" in check.detail, check
    weak = PGD(**attack_kwargs("pgd_eval", eps=eps, steps=1, step_size=eps / 8,
                               random_start=False))
    torch.manual_seed(0)
    robust = _reported(model, weak, x, y)
    check, _ = more_steps_check(
        model, x, y, TASK, robust, "pgd (PGD-20)", stronger,
        redraw=lambda mask: _reported(model, weak, x[mask], y[mask]))
    assert not check.passed and "upper bound" in check.detail, check


def test_preflight_changes_neither_the_weights_nor_batchnorm_statistics(trained_model, train_cfg,
                                                                        tmp_path):
    """The stronger-PGD preflight runs before the evaluation on the same network: it must leave
    every weight and BatchNorm buffer, and the network's mode, as they were (a train-mode
    forward pass would move the running statistics the evaluation then reports on), and its
    own predictions are the eval-mode ones."""
    from lightning_modules.core.config import instantiate_node
    from lightning_modules.evaluation.checkpoint import build_network
    from lightning_modules.evaluation.preflight import more_steps_preflight

    model, _, _ = trained_model
    cfg = train_cfg("datamodule.image_size=16", "datamodule.n_test=64")
    datamodule = instantiate_node(cfg, "datamodule")
    model.train()  # as a network built outside Lightning starts
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        eps = 4 / 255
        attacks = {"pgd": attack_from_config("pgd_eval", eps=eps),
                   "fast": attack_from_config("fast", eps=eps, targeted_iters=5, ce_iters=5)}
        check, _ = more_steps_preflight(model, attacks, eps, "multiclass", 4, True, datamodule,
                                        "test", 0, tmp_path, {"accelerator": "cpu"})
        assert check is not None
        assert model.training  # mode put back
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"preflight changed {k}"
    finally:
        model.eval()
    ckpt = {"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}
    assert not build_network(cfg, ckpt).training  # evaluate.py's network starts in eval mode
