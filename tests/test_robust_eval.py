"""The evaluation engine: the per-sample worst case over a suite, with and without the cascade."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.attacks import attack_from_config
from lightning_modules.evaluation.engine import RobustEvaluator


def _suite(eps: float = 16 / 255):
    # deterministic and per-sample independent: the cascade must then change nothing but cost
    return {"fgsm": attack_from_config("fgsm", eps=eps), "pgd": attack_from_config("pgd", eps=eps, steps=5, random_start=False)}


def test_cascade_gives_the_same_worst_case_and_attacks_fewer_images(trained_model):
    model, x, y = trained_model
    x, y = x[:96], y[:96]
    results, costs = {}, {}
    for cascade in (False, True):
        ev = RobustEvaluator("multiclass", 4, _suite(), worst_case={"worst": ["fgsm", "pgd"]},
                             cascade=cascade)
        for i in range(0, 96, 32):
            ev.update(model, x[i:i + 32], y[i:i + 32])
        results[cascade], costs[cascade] = ev.compute(), ev.cost()
    full, casc = results[False], results[True]
    assert casc["worst"]["acc"] == pytest.approx(full["worst"]["acc"])
    assert casc["clean"] == full["clean"]
    assert full["pgd"]["acc"] < full["clean"]["acc"] - 0.1  # the attacks bite
    # cascade rows are cumulative: the first is the worst with clean, the last the worst case
    assert casc["pgd"]["acc"] == pytest.approx(casc["worst"]["acc"])
    assert casc["fgsm"]["acc"] <= min(full["fgsm"]["acc"], full["clean"]["acc"])
    # the first attack skips images wrong already; the second also those FGSM fooled
    n_right = round(full["clean"]["acc"] * 96)
    assert costs[False]["fgsm"]["images_attacked"] == costs[False]["pgd"]["images_attacked"] == 96
    assert costs[True]["fgsm"]["images_attacked"] == n_right
    assert costs[True]["pgd"]["images_attacked"] == round(casc["fgsm"]["acc"] * 96)
    assert all(c["seconds"] > 0 for c in costs[True].values())


def test_cascade_is_single_label_only():
    with pytest.raises(ValueError, match="single-label"):
        RobustEvaluator("multilabel", 3, _suite(), worst_case={"worst": ["fgsm", "pgd"]},
                        cascade=True)


def test_cascade_with_everything_wrong_attacks_nothing(trained_model):
    model, x, _ = trained_model
    x = x[:16]
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 4  # every clean prediction is wrong
    ev = RobustEvaluator("multiclass", 4, _suite(), worst_case={"w": ["fgsm", "pgd"]},
                         cascade=True)
    ev.update(model, x, y)
    assert ev.compute()["w"]["acc"] == 0.0
    assert ev.cost()["fgsm"]["images_attacked"] == ev.cost()["pgd"]["images_attacked"] == 0
    assert torch.isfinite(torch.tensor(ev.compute()["pgd"]["loss"]))
