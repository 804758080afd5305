"""Multi-label attacks: untargeted PGD on the summed BCE, and targeted PGD that hides a finding
the model sees or adds one it does not (Xu et al., MedIA 2021)."""

from __future__ import annotations

import pytest
import torch

from datamodules.synthetic import make_synthetic
from lightning_modules.attacks import attack_from_config
from lightning_modules.attacks.pgd import draw_findings
from lightning_modules.core.tasks import Task
from lightning_modules.models.backbones import small_cnn

TASK = Task("multilabel")
K = 5


@pytest.fixture(scope="module")
def multilabel_model():
    torch.manual_seed(0)
    x, y = make_synthetic(512, K, image_size=16, task="multilabel", signal_amplitude=0.15,
                          seed=3)
    model = small_cnn(K, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for i in range(0, 512, 64):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(x[i:i + 64]), y[i:i + 64].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = make_synthetic(64, K, image_size=16, task="multilabel", signal_amplitude=0.15,
                            seed=4)
    with torch.no_grad():
        acc = ((model(xt) > 0) == yt.bool()).float().mean().item()
    assert acc > 0.8, f"fixture model failed to learn (per-finding acc {acc:.2f})"
    return model, xt, yt


def test_draw_findings_encoding():
    logits = torch.tensor([[2.0, -1.0, 3.0], [-1.0, -2.0, -3.0]])
    enc = draw_findings(logits, "hide")
    goal, chosen = enc % 2, enc >= 2
    assert chosen.sum(1).tolist() == [1, 1]
    assert bool(chosen[0, [0, 2]].any()) and not bool(chosen[0, 1])  # a present one to hide
    assert goal[0][chosen[0]].item() == 0  # its goal is absent; the others keep the prediction
    assert goal[0][~chosen[0]].tolist() == [float(v) for v in (logits[0] > 0)[~chosen[0]]]
    assert goal[1][chosen[1]].item() == 0  # nothing to hide: any finding, goal still absent
    enc = draw_findings(logits, "add", finding=1)
    assert (enc[:, 1] == 3).all()  # chosen (2) + goal present (1)


@pytest.mark.parametrize("how", ["hide", "add"])
def test_targeted_flips_the_chosen_finding_more_than_the_others(multilabel_model, how):
    model, x, _ = multilabel_model
    with torch.no_grad():
        clean = model(x) > 0
    torch.manual_seed(1)
    attack = attack_from_config("pgd", eps=8 / 255, steps=20, targeted=how)
    enc = draw_findings(model(x).detach(), how)  # the same draw the attack makes
    torch.manual_seed(1)
    x_adv = attack(model, x, clean.float(), TASK)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        flips = (model(x_adv) > 0) != clean
    chosen = enc >= 2
    rate_chosen = flips[chosen].float().mean().item()
    rate_others = flips[~chosen].float().mean().item()
    assert rate_chosen > 0.3 and rate_chosen > 3 * rate_others, (rate_chosen, rate_others)
    # one finding given by index: every image acts on it
    x_one = attack_from_config("pgd", eps=8 / 255, steps=20, targeted=how, finding=2)(model, x, clean.float(), TASK)
    with torch.no_grad():
        flips = (model(x_one) > 0) != clean
    acting = ~clean[:, 2] if how == "add" else clean[:, 2]
    assert flips[acting, 2].float().mean() > flips[acting][:, [0, 1, 3, 4]].float().mean()


def test_untargeted_multilabel_pgd_changes_finding_sets(multilabel_model):
    model, x, y = multilabel_model
    x_adv = attack_from_config("pgd", eps=8 / 255, steps=10)(model, x, y, TASK)
    with torch.no_grad():
        changed = ((model(x_adv) > 0) != (model(x) > 0)).any(dim=1).float().mean()
    assert changed > 0.5


def test_targeted_options_are_checked_per_task(trained_model):
    model, x, y = trained_model
    with pytest.raises(ValueError, match="not for multiclass"):
        attack_from_config("pgd", eps=8 / 255, targeted="hide")(model, x[:4], y[:4])
    with pytest.raises(ValueError, match="finding="):
        attack_from_config("pgd", eps=8 / 255, targeted="random", finding=1)
    assert attack_from_config("pgd", targeted="hide").tasks == ("multilabel",)
    assert attack_from_config("pgd", targeted="random").tasks == attack_from_config("pgd", loss="margin").tasks == ("multiclass",)
    assert set(attack_from_config("pgd").tasks) == {"multiclass", "multilabel"}
