"""Weight averaging (lightning_modules/training/averaging.py): the EMA equals a hand-computed
average, the checkpoint and the test hold the averaged weights (also through ``train.py``), a
resumed run is bitwise-equal to an uninterrupted one, and SWA shows no average before it starts."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import WeightAveraging as LightningWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.core.errors import ConfigError
from lightning_modules.training.averaging import WeightAveraging as _WeightAveraging
from lightning_modules.training.averaging import ema_decay
from lightning_modules.training.build import build


def WeightAveraging(kind="ema", decay=0.999, swa_start_epoch=0):  # noqa: N802 - the class
    """The callback with conf/callbacks/default.yaml's settings unless given."""
    return _WeightAveraging(kind=kind, decay=decay, swa_start_epoch=swa_start_epoch, device=None)


class Tiny(L.LightningModule):
    """A linear layer with BatchNorm (running statistics are averaged too)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.tested: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        self.tested = {k: v.clone() for k, v in self.net.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Record(L.Callback):
    """The raw weights after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *_):
        self.steps.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g))
    return DataLoader(data, batch_size=8)


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=callbacks, **kw)


def _fit(tmp_path, averaging, epochs=2, seed=0):
    torch.manual_seed(seed)
    model, record = Tiny(), Record()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="end", monitor=None,
                            enable_version_counter=False)  # written during fit, as train.py's
    trainer = _trainer(tmp_path, [averaging, record, saver], max_epochs=epochs)
    trainer.fit(model, _loader(), _loader(1))
    return model, record, trainer, tmp_path / "end.ckpt"


def test_ema_equals_a_hand_computed_average_and_the_checkpoint_holds_it(tmp_path):
    averaging = WeightAveraging(kind="ema", decay=0.9)
    model, record, trainer, path = _fit(tmp_path, averaging)
    assert len(record.steps) == 12
    expected = {k: v.clone().float() for k, v in record.steps[0].items()}
    for n, step in enumerate(record.steps[1:]):
        d = min(0.9, (1 + n) / (10 + n))
        assert d == ema_decay(0.9, n)
        for k, v in step.items():
            expected[k] = d * expected[k] + (1 - d) * v.float() if v.is_floating_point() \
                else v.float()
    ckpt = torch.load(path, weights_only=False)
    raw = record.steps[-1]
    for k in raw:
        if raw[k].is_floating_point():
            torch.testing.assert_close(ckpt["state_dict"][k], expected[k], rtol=0, atol=1e-6)
            assert torch.equal(ckpt["current_model_state"][k], raw[k])
    assert any(not torch.allclose(ckpt["state_dict"][k], raw[k]) for k in raw
               if raw[k].is_floating_point())
    assert "running_mean" in "".join(raw)  # BatchNorm statistics averaged with the weights
    # training ended: the model holds the average (what test and evaluate.py then use)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])


@pytest.mark.parametrize("callback", [_WeightAveraging, LightningWeightAveraging])
def test_testing_a_checkpoint_after_fit_uses_the_averaged_weights(tmp_path, callback):
    """``train.py`` fits, then tests the selected checkpoint with the same Trainer. Lightning's
    own callback then reloads the raw weights (``current_model_state``) into the model; ours
    keeps the averaged ``state_dict``."""
    averaging = callback() if callback is LightningWeightAveraging else WeightAveraging("ema")
    model, _, trainer, path = _fit(tmp_path, averaging)
    ckpt = torch.load(path, weights_only=False)
    trainer.test(model, _loader(2), ckpt_path=str(path), verbose=False)
    tested = model.tested
    averaged = all(torch.equal(tested[k], ckpt["state_dict"]["net." + k]) for k in tested)
    raw = all(torch.equal(tested[k], ckpt["current_model_state"]["net." + k]) for k in tested)
    if callback is _WeightAveraging:
        assert averaged and not raw
    else:  # the trap this subclass exists for
        assert raw and not averaged


def test_resume_with_averaging_is_bitwise_equal(tmp_path):
    """3 epochs straight vs 1 epoch, then a resume from its end-of-epoch checkpoint (as
    ``last.ckpt``) for 2 more: the same raw weights, average and update count, bit for bit."""
    def run(folder, epochs, ckpt=None):
        torch.manual_seed(0)
        saver = ModelCheckpoint(dirpath=folder, filename="end", monitor=None,
                                enable_version_counter=False)
        trainer = _trainer(folder, [WeightAveraging("ema", decay=0.99), saver], max_epochs=epochs)
        trainer.fit(Tiny(), _loader(), _loader(1), ckpt_path=ckpt)
        return torch.load(folder / "end.ckpt", weights_only=False)

    whole = run(tmp_path / "whole", 3)
    part = run(tmp_path / "part", 1)
    resumed = run(tmp_path / "resumed", 3, ckpt=str(tmp_path / "part" / "end.ckpt"))
    assert part["global_step"] == 6 and resumed["global_step"] == whole["global_step"] == 18
    for key in ("state_dict", "current_model_state", "averaging_state"):
        for k, v in whole[key].items():
            assert torch.equal(v, resumed[key][k]), (key, k)
    assert int(whole["averaging_state"]["n_averaged"]) == 18


def test_swa_averages_epoch_ends_from_its_start_and_shows_raw_weights_before(tmp_path):
    averaging = WeightAveraging(kind="swa", swa_start_epoch=1)
    model, record, trainer, path = _fit(tmp_path, averaging, epochs=3)
    ckpt = torch.load(path, weights_only=False)
    for k, v in record.epochs[1].items():
        if v.is_floating_point():
            torch.testing.assert_close(ckpt["state_dict"][k],
                                       (v + record.epochs[2][k]) / 2, rtol=0, atol=1e-6)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 2
    # before its first update nothing is swapped in and the checkpoint holds the raw weights
    early = WeightAveraging(kind="swa", swa_start_epoch=5)
    model, record, _, path = _fit(tmp_path / "early", early, epochs=2)
    ckpt = torch.load(path, weights_only=False)
    assert "current_model_state" not in ckpt
    for k, v in record.epochs[-1].items():
        assert torch.equal(ckpt["state_dict"][k], v) and torch.equal(model.state_dict()[k], v)


def test_bad_settings_are_one_line(train_cfg):
    with pytest.raises(ValueError, match=r"callbacks.weight_averaging.kind='mean'"):
        WeightAveraging(kind="mean")
    with pytest.raises(ValueError, match=r"decay=1.0 must be in \[0, 1\)"):
        WeightAveraging(decay=1.0)
    with pytest.raises(ConfigError, match=r"defense.averaging='mean'"):
        build(train_cfg("defense.averaging=mean"))


def test_adversarial_training_averages_and_standard_training_does_not(train_cfg):
    def mounted(*overrides):
        return [c for c in build(train_cfg(*overrides))["trainer"].callbacks
                if isinstance(c, _WeightAveraging)]

    (ema,) = mounted("defense=pgd_at")
    assert ema.kind == "ema" and ema.decay == 0.999
    assert mounted("defense=none") == []
    (swa,) = mounted("defense=trades", "defense.averaging=swa")
    assert swa.kind == "swa"


class SaveDuringValidation(L.Callback):
    """A checkpoint written while validation runs on the swapped-in average (as ResumeState
    writes last.ckpt on a SIGTERM that arrives during validation)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == 1 and not self.path.exists():
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_written_during_validation_keeps_raw_and_average_apart(tmp_path):
    mid = tmp_path / "mid.ckpt"
    averaging = WeightAveraging(kind="ema", decay=0.9)
    model, record, trainer, path = _fit(tmp_path, averaging)
    # the same run again, saving during epoch 1's validation
    torch.manual_seed(0)
    again, rec2 = Tiny(), Record()
    trainer = _trainer(tmp_path / "again", [WeightAveraging(kind="ema", decay=0.9), rec2,
                                             SaveDuringValidation(mid)], max_epochs=2,
                       enable_checkpointing=False)
    trainer.fit(again, _loader(), _loader(1))
    during, end = torch.load(mid, weights_only=False), torch.load(path, weights_only=False)
    # validation of epoch 1 runs after its last step: the same raw weights and average as the
    # checkpoint written at the end of epoch 1
    for key in ("state_dict", "current_model_state"):
        for k, v in end[key].items():
            assert torch.equal(during[key][k], v), (key, k)


def test_train_py_tests_the_averaged_weights(train_cfg, tmp_path):
    """Through train.py (PGD-AT, EMA by default): the checkpoint it tests holds the average as
    its state_dict, and the weights trainer.test ran on are exactly those."""
    from omegaconf import open_dict

    from tests.test_ddp import SaveTestedWeights
    from train import train

    weights = tmp_path / "tested.pt"
    cfg = train_cfg("defense=pgd_at", "trainer.max_epochs=2", "threat.train_steps=1",
                    "attack.steps=1", "print_summary=false")
    with open_dict(cfg):
        cfg.callbacks.tested = {"_target_": "tests.test_ddp.SaveTestedWeights",
                                "path": str(weights)}
    assert SaveTestedWeights  # the callback the config names
    result = train(cfg)
    ckpt = torch.load(result["best_checkpoint"], weights_only=False)
    tested = torch.load(weights, weights_only=True)
    assert set(tested) == set(ckpt["state_dict"])
    assert all(torch.equal(tested[k], ckpt["state_dict"][k]) for k in tested)
    assert any(not torch.equal(tested[k], ckpt["current_model_state"][k]) for k in tested
               if tested[k].is_floating_point())
