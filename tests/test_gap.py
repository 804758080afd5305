"""GAP (Poursaeed et al. 2018): the rescaling, the frozen classifier during the fit, the saved
generator, and a fitted generator that hurts more than random noise of the same size."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.synthetic import make_synthetic
from lightning_modules.attacks import attack_from_config
from lightning_modules.attacks.gap import gap_loss, scale_to_ball
from lightning_modules.core.tasks import Task
from lightning_modules.evaluation.gap_fit import GAPModule, load_generator, save_generator

EPS = 32 / 255  # a generator fitted for seconds on a CPU needs a visible budget


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_scale_to_ball_is_exact():
    raw = torch.randn(5, 3, 8, 8)
    d = scale_to_ball(raw, 0.1, "linf")
    assert torch.allclose(d.flatten(1).abs().amax(1), torch.full((5,), 0.1))
    d = scale_to_ball(raw, 0.5, "l2")
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.full((5,), 0.5))


@pytest.mark.parametrize("kind", ["image", "universal"])
def test_gap_output_in_ball_and_pixel_range(kind):
    gap = attack_from_config("gap", eps=EPS, kind=kind, width=4, blocks=1)
    x = torch.rand(6, 3, 18, 18)  # not a multiple of 4: the generator resizes back
    gen = gap.new_generator(3, 18)
    x_adv = gap.with_generator(gen)(torch.nn.Flatten(), x, torch.zeros(6, dtype=torch.long))
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().amax() <= EPS + 1e-6
    if kind == "universal":  # one pattern: the same delta wherever nothing was clipped
        mid = torch.full((6, 3, 18, 18), 0.5)
        d = gap.with_generator(gen)(torch.nn.Flatten(), mid, torch.zeros(6)) - mid
        assert torch.allclose(d, d[:1].expand_as(d), atol=1e-6)
    with pytest.raises(ValueError, match="no generator"):
        gap(torch.nn.Flatten(), x, torch.zeros(6))


def test_gap_loss_targets():
    clean = torch.tensor([[3.0, 0.0, -2.0]])
    # single-label: cross-entropy toward the least likely clean class (2)
    assert gap_loss(torch.tensor([[0.0, 0.0, 9.0]]), clean, Task("multiclass")) < 0.01
    # multi-label: BCE toward the flipped clean predictions (present, absent, absent at 0.5)
    assert gap_loss(torch.tensor([[-9.0, 9.0, 9.0]]), clean, Task("multilabel")) < 0.01


def test_fitted_gap_beats_random_noise_and_leaves_the_classifier_alone(trained_model, tmp_path):
    model, x_test, y_test = trained_model
    before = copy.deepcopy(model.state_dict())
    x, y = make_synthetic(512, 4, image_size=16, signal_amplitude=0.15, seed=3)
    gap = attack_from_config("gap", eps=EPS, kind="image", width=8, blocks=2, epochs=5, lr=5e-3)
    gen = gap.new_generator(3, 16)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=gap.epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(GAPModule(gap, gen, model, "multiclass"),
                DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    after = model.state_dict()  # frozen: weights and BatchNorm statistics untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    attack = gap.with_generator(gen)
    clean = _acc(model, x_test, y_test)
    adv = _acc(model, attack(model, x_test, y_test), y_test)
    torch.manual_seed(1)
    noise = (x_test + EPS * torch.randn_like(x_test).sign()).clamp(0, 1)
    noisy = _acc(model, noise, y_test)
    assert adv < noisy - 0.2 and adv < clean - 0.2, (clean, noisy, adv)
    # saved with tensors only, reused when the settings match, refused when they do not
    save_generator(tmp_path / "g.pt", gen, gap, {"fit_seconds": 1.0})
    loaded, meta = load_generator(tmp_path / "g.pt", gap, 3, 16)
    assert meta == {"fit_seconds": 1.0}
    assert torch.equal(gap.with_generator(loaded)(model, x_test, y_test),
                       attack(model, x_test, y_test))
    assert load_generator(tmp_path / "g.pt", gap.replace(width=4), 3, 16) is None
    # a generator fitted at one radius is not reused at another
    assert load_generator(tmp_path / "g.pt", gap.with_eps(gap.eps / 2), 3, 16) is None
    save_generator(tmp_path / "h.pt", gen, gap, {}, against={"checkpoint": "a.ckpt"})
    assert load_generator(tmp_path / "h.pt", gap, 3, 16, {"checkpoint": "a.ckpt"}) is not None
    assert load_generator(tmp_path / "h.pt", gap, 3, 16, {"checkpoint": "b.ckpt"}) is None
    assert torch.load(tmp_path / "g.pt", weights_only=True)["signature"]["kind"] == "image"
