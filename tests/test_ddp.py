"""DDP gives the numbers of one process: DistributedSampler padding is left out of every metric."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_modules.attacks import attack_from_config
from lightning_modules.evaluation.engine import RobustEvaluator
from lightning_modules.training.build import build
from lightning_modules.training.module import padding_mask
from tests.conftest import ROOT, compose_cfg
from tests.test_train import CLI_FAST, DDP_DEBUG, _run_group
from train import train


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
    suite = {"fgsm": attack_from_config("fgsm", eps=8 / 255), "pgd": attack_from_config("pgd", eps=8 / 255, steps=3, random_start=False)}
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
# the clean point) so that both sides see the same adversarial images. With an EMA of the
# weights: the DDP run validates and checkpoints the average, one process loads it.
EQUAL_RUN = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
    "datamodule.n_train=128", "datamodule.n_val=37", "datamodule.n_test=37",
    "datamodule.batch_size=16", "datamodule.eval_batch_size=8", "datamodule.image_size=16",
    "datamodule.signal_amplitude=0.15", "backbone.width=8", "defense=none",
    "attack.steps=2", "attack.random_start=false", "print_summary=false",
    "defense.averaging=ema",  # weight averaging under DDP: validation and checkpoints average
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


# ------------------------------------------- SyncBatchNorm: attacks leave no trace, send nothing
# Run as its own script: Lightning's DDP launcher starts it again for rank 1. torch's
# SyncBatchNorm runs on CUDA only (batch_norm_stats has no CPU kernel, and DDP refuses it on
# CPU modules); on these CPU ranks a stand-in synchronises the batch statistics with a differentiable all_reduce in the forward
# pass (and its gradient in the backward pass), which is what the real one communicates.
SYNC_BN_SCRIPT = '''
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_modules.attacks.base import Attack
from lightning_modules.training.build import build
from train import train

conf_dir, out = sys.argv[1], Path(sys.argv[2])
state = {"in_attack": 0, "attacks": 0, "bn_changed": 0, "ddp_wrapper_attacked": 0,
         "collectives_in_attack": [], "collectives": 0, "synced_forwards": 0,
         "hooks": 0, "hooks_in_attack": 0, "hooks_per_step": []}


def cpu_sync_batch_norm(self, x):
    if not (self.training and dist.is_initialized()):
        return nn.modules.batchnorm._BatchNorm.forward(self, x)
    state["synced_forwards"] += 1
    dims = [d for d in range(x.dim()) if d != 1]
    n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
    total = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), n]))
    c = x.shape[1]
    count = total[-1]
    mean, var = total[:c] / count, total[c:2 * c] / count - (total[:c] / count) ** 2
    with torch.no_grad():
        self.num_batches_tracked.add_(1)
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var * count / (count - 1))
    shape = [1, c] + [1] * (x.dim() - 2)
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
    return x_hat * self.weight.view(shape) + self.bias.view(shape)


nn.SyncBatchNorm.forward = cpu_sync_batch_norm
DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None  # GPU check

for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
             "gather", "scatter", "barrier"):
    def counted(*args, _fn=getattr(dist, name), _name=name, **kwargs):
        state["collectives"] += 1
        if state["in_attack"]:
            state["collectives_in_attack"].append(_name)
        return _fn(*args, **kwargs)
    setattr(dist, name, counted)

attack_call = Attack.__call__


def recorded_call(self, model, x, *args, **kwargs):
    state["ddp_wrapper_attacked"] += isinstance(model, DistributedDataParallel)
    before = {k: v.clone() for k, v in model.named_buffers()}
    state["in_attack"] += 1
    try:
        return attack_call(self, model, x, *args, **kwargs)
    finally:
        state["in_attack"] -= 1
        state["attacks"] += 1
        after = dict(model.named_buffers())
        state["bn_changed"] += any(not torch.equal(v, after[k]) for k, v in before.items())


Attack.__call__ = recorded_call


def counting_hook(process_group, bucket):
    state["hooks"] += 1
    state["hooks_in_attack"] += bool(state["in_attack"])
    return allreduce_hook(process_group, bucket)


class Probe(Callback):
    def on_train_start(self, trainer, pl_module):
        ddp = trainer.strategy.model
        state["ddp"] = isinstance(ddp, DistributedDataParallel)
        ddp.register_comm_hook(None, counting_hook)
        bns = [m for m in pl_module.net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        state["bn_layers"] = len(bns)
        state["sync_bn_layers"] = sum(isinstance(m, nn.SyncBatchNorm) for m in bns)
        self.start = [m.running_mean.clone() for m in bns]
        self.bns, self.hooks = bns, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        state["hooks_per_step"].append(state["hooks"] - self.hooks)
        self.hooks = state["hooks"]

    def on_fit_end(self, trainer, pl_module):
        state["running_stats_moved"] = any(
            not torch.equal(a, m.running_mean) for a, m in zip(self.start, self.bns))
        path = out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(state))


if __name__ == "__main__":
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name="train", overrides=sys.argv[3:])
    parts = build(cfg)
    parts["trainer"].callbacks.append(Probe())
    parts["trainer"].fit(parts["module"], datamodule=parts["datamodule"])
'''


@pytest.mark.slow
def test_sync_batchnorm_attacks_change_no_statistics_and_send_nothing(tmp_path):
    """``trainer=ddp_sim trainer.sync_batchnorm=true`` with PGD-AT (training attacks in
    model_mode=train, batch statistics) and PGD validation: every BatchNorm is a SyncBatchNorm,
    no attack changes a buffer or calls a collective (no batch-statistics sync, no gradient
    all-reduce: DDP's comm hook never fires while crafting, and fires as often in every step),
    while the training forward passes do synchronise and move the running statistics."""
    script = tmp_path / "sync_bn_run.py"
    script.write_text(SYNC_BN_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    overrides = ["trainer=ddp_sim", "trainer.sync_batchnorm=true", "defense=pgd_at",
                 "threat.train_steps=2", "attack.steps=2", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                 "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                 "datamodule.n_train=96", "datamodule.n_val=16", "datamodule.batch_size=16",
                 "datamodule.image_size=16", "backbone.width=8", "callbacks=none", "~logger",
                 f"paths.output_dir={out}", f"paths.log_dir={tmp_path}"]
    proc = _run_group([str(script), str(ROOT / "conf"), str(out), *overrides], cwd=tmp_path,
                      timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        s = json.loads((out / f"rank{rank}.json").read_text())
        assert s["ddp"] and s["bn_layers"] == s["sync_bn_layers"] > 0, (rank, s)
        assert s["attacks"] >= 4 and s["ddp_wrapper_attacked"] == 0, (rank, s)
        assert s["bn_changed"] == 0, (rank, s)
        assert s["collectives_in_attack"] == [] and s["hooks_in_attack"] == 0, (rank, s)
        # the training forwards synchronise (3 steps x layers) and move the statistics
        assert s["synced_forwards"] >= 3 * s["bn_layers"] and s["running_stats_moved"], s
        assert len(s["hooks_per_step"]) == 3 and len(set(s["hooks_per_step"])) == 1, s
        assert s["hooks_per_step"][0] >= 1, s


# ------------------------------------------------------- debug mode x callback set, never a hang
class SaveTestedWeights(L.Callback):
    """Rank 0 writes the weights ``trainer.test`` runs on (after any checkpoint is restored),
    so that one process can test the same weights (``+callbacks.tested_weights``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_test_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(pl_module.state_dict(), self.path)


def _one_process_test(weights: Path, overrides: list[str], out: Path) -> dict[str, float]:
    """Test metrics of ``weights`` in this process, on every test image, with ``overrides``."""
    cfg = compose_cfg("train", [*overrides, "callbacks=none", "~logger",
                                "+trainer.enable_checkpointing=false",
                                "trainer.limit_test_batches=null"], out)
    parts = build(cfg)
    parts["module"].load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    (metrics,) = parts["trainer"].test(parts["module"], datamodule=parts["datamodule"],
                                       verbose=False)
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize("callbacks", ["fast_at", "none"])
@pytest.mark.parametrize("mode", sorted(DDP_DEBUG))
def test_ddp_sim_debug_mode_x_callbacks(tmp_path, mode, callbacks):
    """``trainer=ddp_sim`` in each debug mode with each callback set, progress bar on, under a
    timeout that kills both ranks: the run ends, tests and writes its metrics, and they are
    those of one process testing the same weights on the same 32 images (1 batch of 16 per
    rank; PGD from the clean point). (The default callback set is
    ``tests/test_train.py::test_cli_ddp_sim_never_hangs``.) ``fast_at`` restores and stops on
    collapse: a decision every rank must take alike."""
    fast = [o for o in CLI_FAST if "enable_progress_bar" not in o and "max_epochs" not in o]
    weights = tmp_path / "tested.pt"
    proc = _run_group([str(ROOT / "train.py"), *fast, "trainer=ddp_sim", *DDP_DEBUG[mode],
                       f"callbacks={callbacks}", "trainer.enable_progress_bar=true",
                       "attack.random_start=false",
                       "+callbacks.tested_weights._target_=tests.test_ddp.SaveTestedWeights",
                       f"+callbacks.tested_weights.path={weights}",
                       f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test metric" in proc.stdout
    result = json.loads(next(tmp_path.glob("train/runs/*/metrics.json")).read_text())
    one = _one_process_test(weights, [o for o in fast if "limit_test_batches" not in o]
                            + ["attack.random_start=false"], tmp_path / "one")
    ddp = result["test"]
    assert len(ddp) >= 15 and {"test/acc", "test/adv_acc", "test/adv_loss"} <= set(ddp)
    assert set(ddp) == set(one)
    diffs = {k: (ddp[k], one[k]) for k in ddp if ddp[k] != pytest.approx(one[k], abs=1e-5)}
    assert not diffs, diffs
    assert round(ddp["test/acc"] * 32, 4).is_integer()  # 32 images, no padding counted
    if callbacks == "none":  # at most Lightning's own default checkpoint, never a selection
        assert not {"best_clean", "best_robust"} & set(result["checkpoints"])


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compiled_backbone_trains(train_cfg):
    """``module.compile=true``: the backbone runs compiled (attacks in train and eval mode
    included) for a training step, validation and test, its test metrics are those of the
    tested checkpoint run eagerly (PGD from the clean point), and checkpoints keep plain
    keys."""
    from lightning_modules.training.module import RobustClassifier

    seen = []
    setup = RobustClassifier.setup

    def recording_setup(self, stage):
        setup(self, stage)
        seen.append((stage, self._compiled, self.net._compiled_call_impl is not None))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RobustClassifier, "setup", recording_setup)
        run = ("defense=pgd_at", "threat.train_steps=2", "attack.steps=2",
               "attack.random_start=false", "trainer.limit_train_batches=1")
        result = train(train_cfg("module.compile=true", *run))
    assert ("fit", True, True) in seen
    parts = build(train_cfg(*run, "callbacks=none", "~logger",
                            "+trainer.enable_checkpointing=false"))
    assert not parts["module"].hparams.get("compile")
    (eager,) = parts["trainer"].test(parts["module"], datamodule=parts["datamodule"],
                                     ckpt_path=result["best_checkpoint"], verbose=False)
    compiled = result["test"]
    assert set(compiled) == set(eager) and len(compiled) >= 15
    diffs = {k: (compiled[k], float(eager[k])) for k in compiled
             if compiled[k] != pytest.approx(float(eager[k]), abs=1e-4)}
    assert not diffs, diffs
    state = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    assert not any("_orig_mod" in k for k in state["state_dict"])
