"""The catastrophic-overfitting monitor."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.training.build import build
from lightning_modules.training.callbacks import CatastrophicOverfittingMonitor
from tests.conftest import compose_cfg


def _parts(tmp_path, *overrides):
    torch.manual_seed(0)
    cfg = compose_cfg("train", [
        "defense=fast_at", "callbacks=fast_at", "trainer.max_epochs=6",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "datamodule.n_train=64", "datamodule.n_val=64",
        "datamodule.n_test=32", "datamodule.batch_size=16", "datamodule.image_size=16",
        "backbone.width=8", "callbacks.co_monitor.n_samples=32", *overrides,
    ], tmp_path)
    return build(cfg)


def _monitor(trainer) -> CatastrophicOverfittingMonitor:
    return next(c for c in trainer.callbacks if isinstance(c, CatastrophicOverfittingMonitor))


@pytest.mark.parametrize("overrides", [("defense.averaging=none",), (),
                                       ("defense=fgsm_pgi",)])
def test_fires_on_synthetic_collapse_and_restores(tmp_path, overrides):
    """Restores the weights of the last good epoch and stops; with weight averaging (EMA, the
    default) training ends with the average of that epoch; FGSM-PGI (no attack objects) is
    watched like the other single-step defenses."""
    parts = _parts(tmp_path, *overrides)
    trainer, module = parts["trainer"], parts["module"]
    monitor = _monitor(trainer)
    script = iter([(0.50, 0.55), (0.62, 0.66), (0.03, 0.90), (0.7, 0.7), (0.7, 0.7)])
    snap = {}

    def scripted(pl_module):
        pgd, fgsm = next(script)
        if pgd < 0.1:  # the collapsed weights, before the callback reacts
            snap["collapsed"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        return pgd, fgsm

    monitor.measure = scripted
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting at epoch 2"):
        trainer.fit(module, datamodule=parts["datamodule"])
    assert monitor.collapsed_epoch == 2 and monitor.good_epoch == 1
    assert trainer.current_epoch == 3  # stopped after epoch 2, not at max_epochs=6
    final = module.state_dict()
    if "defense.averaging=none" in overrides:
        good = monitor.good_state
        assert monitor.good_average is None
    else:  # the AveragedModel's entries of the module: "module.<key>"
        good = {k[len("module."):]: v for k, v in monitor.good_average.items()
                if k.startswith("module.")}
        assert set(good) == set(final)
    assert all(torch.equal(final[k], v) for k, v in good.items())
    assert any(not torch.equal(final[k], v) for k, v in snap["collapsed"].items())


def test_no_false_alarm_and_real_measurement(tmp_path):
    parts = _parts(tmp_path, "trainer.max_epochs=2", "callbacks.co_monitor.action=stop")
    trainer, module = parts["trainer"], parts["module"]
    trainer.fit(module, datamodule=parts["datamodule"])
    monitor = _monitor(trainer)
    assert monitor.collapsed_epoch is None and trainer.current_epoch == 2
    pgd, fgsm = monitor.measure(module)
    assert 0.0 <= pgd <= fgsm + 1e-6 <= 1.0 + 1e-6  # PGD-10 from the FGSM point is no weaker here
    assert "co/pgd_acc" in trainer.callback_metrics


def test_bad_arguments():
    with pytest.raises(ValueError, match="action"):
        CatastrophicOverfittingMonitor(eps=None, pgd_steps=10, n_samples=256, min_drop=0.2, action="panic")
    with pytest.raises(ValueError, match="min_drop"):
        CatastrophicOverfittingMonitor(eps=None, pgd_steps=10, n_samples=256, min_drop=0, action="warn")


def test_silent_without_adversarial_training(tmp_path):
    parts = _parts(tmp_path, "defense=none", "trainer.max_epochs=3")
    trainer, module = parts["trainer"], parts["module"]
    monitor = _monitor(trainer)
    script = iter([(0.60, 0.65), (0.05, 0.20), (0.01, 0.10)])
    monitor.measure = lambda pl_module: next(script)
    trainer.fit(module, datamodule=parts["datamodule"])  # an undefended model just gets less robust
    assert monitor.collapsed_epoch is None and trainer.current_epoch == 3
