"""FGSM-PGI (Jia et al., ECCV 2022; FGSM-MEP): one training step against a computation written
from the paper's formulas (prior, FGSM step, momentum, next prior, regularised loss), priors
kept per image across epochs and reset, state in the checkpoint, and an end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.defenses import FGSMPGI
from lightning_modules.models.backbones import small_cnn

EPS = 8 / 255


def _defense(**kw):
    args = {"eps": EPS, "norm": "linf", "step_size_rel": 1.0, "momentum": 0.3,
            "reg_weight": 10.0, "reset_every": 2, "name": "fgsm_pgi", **kw}
    return FGSMPGI(**args)


def _model(seed=0):
    torch.manual_seed(seed)
    return small_cnn(3, width=4).train()


def _reference_step(model, x, y, delta, m, eps, alpha, mu, lam):
    """The paper's step, written out: returns (loss, delta_adv, next momentum, next prior)."""
    def clip(d):
        return torch.clamp(x + torch.clamp(d, -eps, eps), 0, 1) - x

    d0 = clip(delta).clone().requires_grad_(True)
    z0 = model(x + d0)
    g, = torch.autograd.grad(F.cross_entropy(z0, y, reduction="sum"), d0, retain_graph=True)
    d_adv = clip(d0.detach() + alpha * torch.sign(g))
    m_new = mu * m + g / g.abs().sum(dim=(1, 2, 3), keepdim=True)
    prior = clip(d0.detach() + alpha * torch.sign(m_new))
    z = model(x + d_adv)
    loss = F.cross_entropy(z, y) + lam * ((z - z0) ** 2).mean()
    return loss, d_adv, m_new, prior


def test_one_step_matches_the_formula_and_the_prior_carries_over():
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    index = torch.tensor([4, 0, 7, 2, 9, 5])
    defense = _defense()
    defense.on_train_epoch_start(0, num_samples=10)
    model = _model()
    torch.manual_seed(1)
    out = defense(model, x, y, "multiclass", index=index)
    # the initial prior: alpha * sign(U(-eps, eps)) from the same random draw
    torch.manual_seed(1)
    init = EPS * torch.empty_like(x).uniform_(-EPS, EPS).sign()
    ref_loss, _, m1, p1 = _reference_step(_model(), x, y, init, torch.zeros_like(x), EPS, EPS,
                                          0.3, 10.0)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(defense.grad_momentum[index], m1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(defense.prior[index], p1, rtol=0, atol=1e-7)
    assert defense.prior.shape[0] == 10 and not defense.fresh[index].any()
    assert defense.fresh[[1, 3, 6, 8]].all()  # images not seen yet keep no prior
    # the next epoch starts from the stored prior and momentum, not from a new draw
    defense.on_train_epoch_start(1, num_samples=10)
    out2 = defense(model, x, y, "multiclass", index=index)
    ref2, _, m2, p2 = _reference_step(model, x, y, p1, m1, EPS, EPS, 0.3, 10.0)
    torch.testing.assert_close(out2.loss, ref2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(defense.prior[index], p2, rtol=0, atol=1e-7)
    # the perturbation stays in the threat model and the pixel range
    assert defense.prior.abs().max() <= EPS + 1e-7
    assert ((x + defense.prior[index]) >= 0).all() and ((x + defense.prior[index]) <= 1).all()
    # epoch 2 = reset_every: every prior is drawn again
    defense.on_train_epoch_start(2, num_samples=10)
    assert defense.fresh.all()


def test_regulariser_weight_zero_is_fgsm_from_the_prior():
    x, y, index = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 1]), torch.arange(4)
    defense = _defense(reg_weight=0.0)
    model = _model()
    torch.manual_seed(0)
    out = defense(model, x, y, "multiclass", index=index)
    torch.manual_seed(0)
    init = EPS * torch.empty_like(x).uniform_(-EPS, EPS).sign()
    _, d_adv, _, _ = _reference_step(_model(), x, y, init, torch.zeros_like(x), EPS, EPS, 0.3,
                                     0.0)
    torch.testing.assert_close(out.loss, F.cross_entropy(_model()(x + d_adv), y), rtol=1e-5,
                               atol=1e-6)


def test_state_round_trip_and_bad_settings():
    defense = _defense()
    defense(_model(), torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2]), "multiclass",
            index=torch.tensor([0, 1, 2]))
    state = defense.state_dict()
    other = _defense()
    other.load_state_dict(state)
    assert torch.equal(other.prior, defense.prior) and torch.equal(other.fresh, defense.fresh)
    with pytest.raises(ValueError, match="linf only"):
        _defense(norm="l2")
    with pytest.raises(ValueError, match="needs the sample indices"):
        _defense()(_model(), torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), "multiclass")


@pytest.mark.slow
def test_train_py_runs_fgsm_pgi_with_indices_and_keeps_the_priors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), "defense=fgsm_pgi", "callbacks=fast_at",
         "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
         "datamodule.n_train=96", "datamodule.n_val=32", "datamodule.n_test=32",
         "datamodule.image_size=16", "backbone.width=8", "attack.steps=2",
         "callbacks.co_monitor.n_samples=16", "callbacks.co_monitor.pgd_steps=2",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["test"]["test/adv_acc"] >= 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    prior = ckpt["defense_state"]["prior"]
    assert prior.shape == (96, 3, 16, 16)
    seen = ~ckpt["defense_state"]["fresh"]
    assert seen.sum() >= 3 * 32 // 2 and prior[seen].abs().max() <= EPS + 1e-6
    assert prior[seen].abs().amax(dim=(1, 2, 3)).min() > 0  # priors were written


def _exchange_rank(rank: int, init_file: str, out: str) -> None:
    """One rank of a 2-process gloo group (its own file rendezvous, no environment variables):
    rank r trains on the images with index % 2 == r, then the epoch-end exchange."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        defense = _defense()
        model = _model()
        x = torch.rand(6, 3, 8, 8)
        y = torch.arange(6) % 3
        index = torch.arange(rank, 6, 2)
        defense.on_train_epoch_start(0, num_samples=6)
        defense(model, x[index], y[index], "multiclass", index=index)
        before = {k: v.clone() for k, v in defense.state_dict().items()}
        defense.on_train_epoch_end()
        torch.save({"before": before, "after": defense.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_exchange_gives_every_rank_the_rows_the_others_updated(tmp_path):
    """Under DDP each rank updates only its own images' priors; after the epoch-end all-reduce
    both ranks hold the same priors and momenta: each row from the rank that updated it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_exchange_rank, args=(r, str(tmp_path / "rdv"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    own = {0: torch.arange(0, 6, 2), 1: torch.arange(1, 6, 2)}
    for rank, res in ((0, r0), (1, r1)):
        assert res["before"]["fresh"][own[1 - rank]].all()      # not seen here before
        assert not res["after"]["fresh"].any()                  # every image seen by a rank
    for key in ("prior", "momentum"):
        assert torch.equal(r0["after"][key], r1["after"][key])
        for rank, res in ((0, r0), (1, r1)):
            rows = own[rank]
            assert torch.allclose(r0["after"][key][rows], res["before"][key][rows])
            assert res["before"][key][rows].abs().sum() > 0
