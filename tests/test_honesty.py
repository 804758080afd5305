"""Each honesty check passes on an honest model and fires on a model built to trip it: a
softmax output layer, a non-differentiable step, a random model; and on report rows that
break eps = 0, monotonicity or the worst case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.attacks import PGD, attack_from_config
from lightning_modules.core.tasks import Task
from lightning_modules.evaluation.honesty import failed, model_checks, probe_checks, report_checks
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


@pytest.mark.parametrize("wrap,fires", [(Softmax, "outputs_are_logits"),
                                        (Step, "gradients_nonzero_finite"),
                                        (Random, "deterministic")])
def test_each_model_check_fires_on_a_model_built_to_trip_it(trained_model, wrap, fires):
    model, x, y = trained_model
    assert fires in _names(model_checks(wrap(model), x[:32], y[:32], TASK))


def _row(attack, eps, acc):
    return {"attack": attack, "eps": eps, "eps_str": f"{round(eps * 255)}/255", "acc": acc}


def test_report_checks_fire_on_bad_rows():
    clean = {"acc": 0.9}
    good = [_row("pgd", 0, 0.9), _row("pgd", 2 / 255, 0.5), _row("pgd", 8 / 255, 0.2),
            _row("fgsm", 2 / 255, 0.6), _row("worst", 2 / 255, 0.45)]
    assert not failed(report_checks(clean, good, n_images=100))
    bad = [_row("pgd", 0, 0.85), _row("pgd", 2 / 255, 0.3), _row("pgd", 8 / 255, 0.4),
           _row("fgsm", 2 / 255, 0.25), _row("worst", 2 / 255, 0.28)]
    assert _names(report_checks(clean, bad, n_images=100)) == {
        "eps_zero_reproduces_clean", "monotone_in_eps", "worst_case_not_above_attacks"}
    # a rise of one image in 100 is noise of a random start, not a flag
    noisy = [_row("pgd", 2 / 255, 0.30), _row("pgd", 4 / 255, 0.31)]
    assert not failed(report_checks(clean, noisy, n_images=100))


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
    assert not names & {"eps_zero_reproduces_clean", "monotone_in_eps"}


# ----------------------------------------------------------------- attack probes (one batch)
PGD_REF = attack_from_config("pgd", eps=16 / 255, steps=10, model_mode="eval", early_stop=True)


def test_probes_pass_on_an_honest_model_and_attack(trained_model):
    model, x, y = trained_model
    checks = probe_checks(model, x, y, TASK, 4, PGD_REF, square_queries=100, max_images=32)
    assert {c.check for c in checks} == {"large_eps_reaches_chance", "more_steps_never_help",
                                         "square_not_above_white_box"}
    assert not failed(checks), checks


class NoOpPGD(PGD):  # an attack that silently does nothing
    def _perturb(self, model, x, y, task, loss_fn):
        return x


class FadesWithSteps(PGD):  # a "stronger" attack that is weaker: broken for many steps
    def _perturb(self, model, x, y, task, loss_fn):
        return x if self.steps > 20 else super()._perturb(model, x, y, task, loss_fn)


class Saturated(nn.Module):  # logits x 1e4: softmax saturates, the CE gradient underflows
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1e4


@pytest.mark.parametrize("model_wrap,attack_cls,fires", [
    (None, NoOpPGD, {"large_eps_reaches_chance", "square_not_above_white_box"}),
    (None, FadesWithSteps, {"more_steps_never_help"}),
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
