"""DDP gives the numbers of one process: DistributedSampler padding is left out of every metric."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_modules.attacks import FGSM, PGD
from lightning_modules.classifier import padding_mask
from lightning_modules.robust_eval import RobustEvaluator
from tests.conftest import ROOT, compose_cfg
from tests.test_train import _run_group
from train import build


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "world", "batch_size"), [(37, 2, 8), (37, 3, 4), (5, 4, 1),
                                                         (38, 2, 8), (7, 2, 16)])
def test_padding_mask_keeps_every_sample_exactly_once(n, world, batch_size, shuffle):
    """Over all ranks, the kept samples of a DistributedSampler's batches are the dataset,
    each index once (the padding, duplicates of the first indices, is masked out)."""
    data = list(range(n))
    seen, padded = [], 0
    for rank in range(world):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle,
                                     seed=3)
        loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
        for i, batch in enumerate(loader):
            keep = padding_mask(loader, i, len(batch))
            keep = torch.ones(len(batch), dtype=torch.bool) if keep is None else keep
            seen += batch[keep].tolist()
            padded += int((~keep).sum())
    assert sorted(seen) == data
    assert padded == (-n) % world


def test_padding_mask_none_without_distributed_sampler():
    loader = DataLoader(list(range(10)), batch_size=4)
    assert padding_mask(loader, 2, 2) is None


def test_evaluator_ignores_masked_samples(trained_model):
    """A batch with duplicates and a mask gives exactly the metrics of the batch without them."""
    model, x, y = trained_model
    x, y = x[:37], y[:37]
    suite = {"fgsm": FGSM(8 / 255), "pgd": PGD(8 / 255, steps=3, random_start=False)}
    plain = RobustEvaluator("multiclass", 4, suite, worst_case={"worst": ["fgsm", "pgd"]},
                            per_class=True)
    masked = RobustEvaluator("multiclass", 4, suite, worst_case={"worst": ["fgsm", "pgd"]},
                             per_class=True)
    plain.update(model, x, y)
    # as a padded last shard: the first samples again, masked out
    xp, yp = torch.cat([x, x[:3]]), torch.cat([y, y[:3]])
    keep = torch.arange(40) < 37
    masked.update(model, xp[:20], yp[:20], keep=keep[:20])
    masked.update(model, xp[20:], yp[20:], keep=keep[20:])
    masked.update(model, xp[37:], yp[37:], keep=keep[37:])  # all padding: nothing counted
    assert masked.count() == plain.count() == 37
    assert masked.predicted_counts().tolist() == plain.predicted_counts().tolist()
    want, got = plain.compute(), masked.compute()
    assert got.keys() == want.keys()
    for kind in want:
        assert got[kind] == pytest.approx(want[kind], abs=1e-6), kind
    assert want["pgd"]["acc"] < want["clean"]["acc"]  # the attack bites: a real comparison
    # without the mask the duplicates would count
    unmasked = RobustEvaluator("multiclass", 4, suite)
    unmasked.update(model, xp, yp)
    assert unmasked.count() == 40


# ---------------------------------------------------- a ddp_sim run against one process
# 37 validation and test images, 8 per batch and rank: 2 x 8 does not divide 37, so the
# DistributedSampler pads rank 1's last batch with image 0. A deterministic attack (PGD from
# the clean point) so that both sides see the same adversarial images.
EQUAL_RUN = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
    "datamodule.n_train=128", "datamodule.n_val=37", "datamodule.n_test=37",
    "datamodule.batch_size=16", "datamodule.eval_batch_size=8", "datamodule.image_size=16",
    "datamodule.signal_amplitude=0.15", "backbone.width=8", "defense=none",
    "attack.steps=2", "attack.random_start=false", "print_summary=false",
]


def _one_process(ckpt: str, stage: str, out: Path) -> dict[str, float]:
    """``stage`` metrics of ``ckpt`` from the module's own validate/test in this process."""
    cfg = compose_cfg("train", [*EQUAL_RUN, "callbacks=none", "~logger",
                                "+trainer.enable_checkpointing=false"], out)
    parts = build(cfg)
    trainer: L.Trainer = parts["trainer"]
    run = trainer.validate if stage == "val" else trainer.test
    (metrics,) = run(parts["module"], datamodule=parts["datamodule"], ckpt_path=ckpt,
                     verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def test_ddp_sim_metrics_equal_one_process(tmp_path):
    proc = _run_group([str(ROOT / "train.py"), *EQUAL_RUN, "trainer=ddp_sim",
                       f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("train/runs/*/metrics.json")).read_text())
    ddp = {**result["val"], **result["test"]}
    # val/ was logged at the end of the last epoch: the weights of last.ckpt
    one = {**_one_process(result["checkpoints"]["last"], "val", tmp_path / "one_val"),
           **_one_process(result["best_checkpoint"], "test", tmp_path / "one_test")}
    compared = [k for k in one if k.split("/")[0] in ("val", "test")
                and not k.startswith(("val/adv_score_best", "val/sel_", "val/eligible"))]
    assert len(compared) >= 20 and {"val/loss", "val/auroc", "test/adv_loss"} <= set(compared)
    diffs = {k: (ddp[k], one[k]) for k in compared if ddp[k] != pytest.approx(one[k], abs=1e-5)}
    print("ddp_sim vs one process, largest difference:",
          max(compared, key=lambda k: abs(ddp[k] - one[k])),
          max(abs(ddp[k] - one[k]) for k in compared), f"over {len(compared)} metrics")
    assert not diffs, diffs
    # a count of 38 (padding included) could not give these values
    assert round(ddp["val/acc"] * 37, 4).is_integer() and round(ddp["test/acc"] * 37, 4) \
        .is_integer()
