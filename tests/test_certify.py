"""Randomized smoothing: the training defenses (gaussian, smoothadv) against hand computations,
Cohen et al.'s CERTIFY and PREDICT against closed forms and scipy, and evaluation=certify end
to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.stats import beta, binom, norm
from torch import nn

from evaluate import evaluate
from lightning_modules.attacks.config import attack_from_config
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.tasks import Task
from lightning_modules.defenses import GaussianAugmentation, SmoothAdv
from lightning_modules.defenses.smoothing import SoftSmoothed
from lightning_modules.evaluation.assemble import build_certifier
from lightning_modules.evaluation.certify import (
    ABSTAIN,
    Certifier,
    certify,
    image_generator,
    lower_confidence_bound,
    predict_from_counts,
)
from lightning_modules.evaluation.honesty import certify_checks
from lightning_modules.evaluation.schema import EvalReport
from lightning_modules.evaluation.writer import summary_markdown
from tests.conftest import FAST, compose_cfg
from train import train


class LinearBinary(nn.Module):
    """Class 1 where ``w . x + b > 0``: logits ``(0, w . x + b)``."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        z = x.flatten(1).double() @ self.w.double() + self.b.double()
        return torch.stack([torch.zeros_like(z), z], dim=1).float()


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [image_generator(seed, i, "cpu") for i in range(n)]


@pytest.fixture(scope="module")
def linear():
    """A linear binary classifier and 4 images at L2 distances 0.05, 0.2, 0.35 and 0.5 from its
    hyperplane (1 x 8 x 8 pixels), on both sides."""
    torch.manual_seed(0)
    w = torch.randn(64)
    b = 0.1
    base = torch.rand(64)
    base = base - (base @ w + b) / (w @ w) * w  # on the hyperplane
    dist = torch.tensor([0.05, -0.2, 0.35, -0.5])
    x = base + dist.view(-1, 1) * w / w.norm()
    return LinearBinary(w, b).eval(), x.view(-1, 1, 8, 8), dist.abs()


def test_clopper_pearson_bound_against_scipy():
    for k, n, alpha in [(1, 10, 0.05), (990, 1000, 0.001), (500, 1000, 0.001),
                        (100_000, 100_000, 0.001), (37, 100, 0.01)]:
        p = lower_confidence_bound(k, n, alpha)
        # the definition: the p at which k or more successes have probability alpha
        assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)
        # Cohen et al.: statsmodels' proportion_confint(k, n, alpha=2 alpha, method="beta")[0]
        assert p == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0


def test_certified_radius_of_a_linear_classifier_approaches_its_closed_form(linear):
    """For f(x) = [w.x + b > 0] the smoothed classifier's radius is sigma Phi^-1(p_A) with
    p_A = Phi(|w.x + b| / (sigma ||w||)), i.e. the distance to the hyperplane."""
    net, x, dist = linear
    sigma = 0.25
    p_a = norm.cdf(dist.numpy() / sigma)
    exact = sigma * norm.ppf(p_a)
    assert exact == pytest.approx(dist.numpy(), rel=1e-6)
    out = {}
    for n in (1000, 100_000):
        out[n] = certify(net, x, sigma, 100, n, 0.001, 20_000, gens(n, 4), 2)
        assert (out[n]["pred"] != ABSTAIN).all()
        assert (out[n]["pred"] == torch.tensor([1, 0, 1, 0])).all()
        assert (out[n]["radius"].numpy() <= exact + 1e-9).all(), (out[n]["radius"], exact)
    gap_small = exact - out[1000]["radius"].numpy()
    gap_large = exact - out[100_000]["radius"].numpy()
    assert (gap_large < gap_small).all()
    assert (out[100_000]["radius"].numpy() > 0.9 * exact).all()


def test_abstains_when_the_two_top_classes_tie(linear):
    net, x, _ = linear
    on_plane = x[:1] - 0.05 * net.w.detach().view(1, 1, 8, 8) / net.w.detach().norm()
    out = certify(net, on_plane, 0.25, 100, 2000, 0.001, 1000, gens(0, 1), 2)
    assert out["pred"].item() == ABSTAIN and out["radius"].item() == 0.0
    assert predict_from_counts(out["counts"], 0.001).item() == ABSTAIN
    counts = torch.tensor([[50, 50, 0], [100, 0, 0], [60, 40, 0], [0, 3, 97]])
    assert predict_from_counts(counts, 0.001).tolist() == [ABSTAIN, 0, ABSTAIN, 2]


def _certifier(**kw) -> Certifier:
    opts = {"sigma": 0.25, "n0": 20, "n": 200, "alpha": 0.001, "batch_size": 64,
            "radii": [0, 0.5], "attack": attack_from_config("pgd", "l2", steps=2),
            "attack_samples": 2, **kw}
    return Certifier(**opts)


def test_seeded_certification_is_reproducible(trained_model):
    model, x, y = trained_model
    x, y = x[:6], y[:6]
    cert = _certifier()
    torch.manual_seed(1)
    a = cert.run(model, x, y, list(range(6)), seed=3, num_classes=4)
    torch.manual_seed(1)
    b = cert.run(model, x, y, list(range(6)), seed=3, num_classes=4)
    assert torch.equal(a, b) and a.shape == (6, 4 + 2)
    # an image's certificate depends on its generator only, not on the rest of its batch
    one = certify(model, x[2:3], 0.25, 20, 200, 0.001, 64, [image_generator(3, 2, "cpu")], 4)
    assert one["pred"].item() == a[2, 1].item()
    assert one["radius"].item() == pytest.approx(a[2, 2].item())
    other = certify(model, x, 0.25, 20, 200, 0.001, 64, gens(4, 6), 4)
    assert not torch.equal(other["counts"], certify(model, x, 0.25, 20, 200, 0.001, 64,
                                                    gens(3, 6), 4)["counts"])


def test_n_and_alpha_reach_the_computation(tmp_path, trained_model):
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", "evaluation=certify",
                               "evaluation.certify.n=321", "evaluation.certify.alpha=0.01",
                               "evaluation.certify.n0=7"], tmp_path)
    trained = OmegaConf.create({"defense": {"name": "gaussian", "sigma": 0.5}})
    cert, source = build_certifier(cfg.evaluation, trained, "multiclass")
    assert (cert.n, cert.n0, cert.alpha, cert.sigma) == (321, 7, 0.01, 0.5)
    assert source.startswith("checkpoint")
    assert cert.radii == [0, 0.25, 0.5, 1.0] and cert.attack.norm == "l2"
    model, x, _ = trained_model
    out = certify(model, x[:4], cert.sigma, cert.n0, cert.n, cert.alpha, 100, gens(0, 4), 4)
    assert (out["counts"].sum(1) == 321).all()
    n_a = out["counts"].max(1).values
    for i in range(4):
        if out["pred"][i] != ABSTAIN:
            want = 0.5 * norm.ppf(beta.ppf(0.01, int(n_a[i]), 321 - int(n_a[i]) + 1))
            assert out["radius"][i].item() == pytest.approx(want, rel=1e-9)
    # a smaller alpha gives a smaller radius from the same counts
    assert lower_confidence_bound(300, 321, 0.001) < lower_confidence_bound(300, 321, 0.01)
    # sigma: the override wins; without either, one line naming the key
    with_sigma = compose_cfg("eval", ["ckpt_path=x.ckpt", "evaluation=certify",
                                      "evaluation.certify.sigma=0.12"], tmp_path)
    cert, source = build_certifier(with_sigma.evaluation, trained, "multiclass")
    assert cert.sigma == 0.12 and source == "evaluation.certify.sigma"
    plain = OmegaConf.create({"defense": {"name": "pgd_at"}})
    with pytest.raises(ConfigError, match="evaluation.certify.sigma is null"):
        build_certifier(cfg.evaluation, plain, "multiclass")
    with pytest.raises(ConfigError, match="single-label"):
        build_certifier(cfg.evaluation, trained, "multilabel")
    bad = compose_cfg("eval", ["ckpt_path=x.ckpt", "evaluation=certify",
                               "evaluation.certify.alpha=0.7"], tmp_path)
    with pytest.raises(ConfigError, match="evaluation.certify.alpha"):
        build_certifier(bad.evaluation, trained, "multiclass")


def test_gaussian_augmentation_loss_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    torch.manual_seed(7)
    out = GaussianAugmentation(0.3, "gaussian")(net, x, y, Task())
    torch.manual_seed(7)
    noisy = x + 0.3 * torch.randn_like(x)
    want = sum(-F.log_softmax(net(noisy[i:i + 1]), 1)[0, y[i]] for i in range(5)) / 5
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.logits_adv.shape == (5, 3)
    with pytest.raises(ValueError, match="defense.sigma"):
        GaussianAugmentation(0.0, "gaussian")


def test_smoothadv_soft_smoothed_loss_and_training_loss_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 1])
    m, sigma = 3, 0.5
    noise = sigma * torch.randn(m, *x.shape)
    # the soft smoothed classifier: log( 1/m sum_j softmax(f(x + delta_j)) )
    soft = SoftSmoothed(net, noise)(x)
    for i in range(4):
        probs = sum(F.softmax(net(x[i:i + 1] + noise[j, i:i + 1]), 1)[0] for j in range(m)) / m
        assert torch.allclose(soft[i], probs.log(), atol=1e-6)
    # SmoothAdv's attack maximises its cross-entropy -log G(x')_y ...
    atk = attack_from_config("pgd_train", "l2", eps=0.5, steps=5, random_start=False)
    x_adv = atk(SoftSmoothed(net, noise), x, y, Task())
    ce = F.nll_loss(SoftSmoothed(net, noise)(x_adv), y, reduction="none")
    assert (ce >= F.nll_loss(soft, y, reduction="none") - 1e-6).all()
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    # ... and the base classifier trains on the m noisy copies of x' (eps 0: x' = x)
    zero = attack_from_config("pgd_train", "l2", eps=0.0)
    torch.manual_seed(5)
    out = SmoothAdv(zero, sigma, m, "smoothadv")(net, x, y, Task())
    torch.manual_seed(5)
    delta = sigma * torch.randn(m, *x.shape)
    want = sum(-F.log_softmax(net(x[i:i + 1] + delta[j, i:i + 1]), 1)[0, y[i]]
               for i in range(4) for j in range(m)) / (4 * m)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(out.logits_adv, SoftSmoothed(net, delta)(x).detach(), atol=1e-5)
    with pytest.raises(ValueError, match="threat=l2"):
        SmoothAdv(attack_from_config("pgd_train", "linf"), sigma, m, "smoothadv")


@pytest.fixture(scope="module")
def smoothed_model():
    """A small CNN trained with Gaussian augmentation (sigma 0.25) on 16 px synthetic images."""
    from datamodules.synthetic import make_synthetic
    from lightning_modules.models.backbones import small_cnn

    torch.manual_seed(0)
    x, y = make_synthetic(512, 4, image_size=16, signal_amplitude=0.15, seed=3)
    model = small_cnn(4, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    defense = GaussianAugmentation(0.25, "gaussian")
    for _ in range(8):
        for i in range(0, 512, 64):
            loss = defense(model, x[i:i + 64], y[i:i + 64], Task()).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = make_synthetic(32, 4, image_size=16, signal_amplitude=0.15, seed=4)
    return model, xt, yt


def test_attack_below_the_certified_radius_never_changes_a_certified_prediction(
        smoothed_model):
    model, x, y = smoothed_model
    sigma = 0.25
    x = x[:16]
    out = certify(model, x, sigma, 100, 1000, 0.001, 1000, gens(0, len(x)), 4)
    done = (out["pred"] != ABSTAIN).nonzero().flatten().tolist()[:8]
    assert len(done) >= 6, "too few certified images for the test to mean anything"
    changed = []
    for i in done:
        radius = out["radius"][i].item()
        gen = image_generator(9, i, "cpu")
        noise = sigma * torch.randn((4, 1, *x.shape[1:]), generator=gen)
        atk = attack_from_config("pgd", "l2", eps=0.9 * radius, steps=10, random_start=False)
        x_adv = atk(SoftSmoothed(model, noise), x[i:i + 1], out["pred"][i:i + 1], Task())
        assert (x_adv - x[i:i + 1]).norm() <= 0.9 * radius + 1e-5
        counts = certify(model, x_adv, sigma, 10, 1000, 0.001, 1000,
                         [image_generator(11, i, "cpu")], 4)["counts"]
        pred = predict_from_counts(counts, 0.001).item()
        if pred not in (out["pred"][i].item(), ABSTAIN):
            changed.append((i, radius, pred))
    assert not changed


def test_certified_balanced_accuracy_by_hand():
    from lightning_modules.evaluation.certify import certify_summary

    # label, CERTIFY class, radius, PREDICT class, then the vote right/undecided at 0.5
    rows = torch.tensor([[0, 0, 0.7, 0, 1, 0], [0, 0, 0.3, 0, 1, 0], [0, 0, 0.9, 0, 1, 0],
                         [1, -1, 0.0, -1, 0, 0], [1, 1, 0.6, 1, 1, 0]], dtype=torch.float64)
    block = certify_summary(rows, _certifier(radii=[0, 0.5]), 1.0, "test")
    assert block["certified_acc"] == {"0": 0.8, "0.5": 0.6}
    assert block["certified_bal_acc"] == pytest.approx({"0": 0.75, "0.5": (2 / 3 + 1 / 2) / 2})
    assert block["majority_share"] == 0.6 and block["abstain_rate"] == 0.2
    assert block["average_certified_radius"] == pytest.approx((0.7 + 0.3 + 0.9 + 0.6) / 5)
    assert block["smoothed_clean_acc"] == 0.8 and block["empirical_smoothed"] == {
        "0.5": {"acc": 0.8, "undecided": 0.0}}


def test_certified_above_empirical_fails_the_check():
    block = {"certified_acc": {"0": 0.9, "0.25": 0.8, "0.5": 0.6},
             "empirical_smoothed": {"0.25": {"acc": 0.85, "undecided": 0.0},
                                    "0.5": {"acc": 0.4, "undecided": 0.1}}}
    (check,) = certify_checks(block, n_images=100)
    assert not check.passed and "0.6000 > attacked 0.4000" in check.detail and "@ L2 0.5" in \
        check.detail
    block["empirical_smoothed"]["0.5"]["undecided"] = 0.2  # ties a correct model may lose
    assert certify_checks(block, n_images=100)[0].passed
    assert certify_checks({"certified_acc": {"0": 1.0}}, 10) == []  # nothing to compare


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gaussian")
    cfg = compose_cfg("train", [*FAST, "backbone.width=8", "defense=gaussian",
                                "defense.sigma=0.25", "trainer.max_epochs=2",
                                "trainer.limit_train_batches=8", "datamodule.n_train=256",
                                "datamodule.signal_amplitude=0.15"], out / "run")
    return train(cfg)


def _certify_cfg(ckpt: str, out: Path, *extra: str):
    return compose_cfg("eval", [
        f"ckpt_path={ckpt}", "evaluation=certify", "subset=12", "evaluation.certify.n0=20",
        "evaluation.certify.n=200", "evaluation.certify.attack.steps=3",
        "evaluation.certify.attack_samples=2", "attacks.pgd.steps=3", f"output_dir={out}",
        *extra], out.parent)


def test_train_gaussian_then_evaluate_certify(gaussian_run, tmp_path):
    ckpt = gaussian_run["best_checkpoint"]
    assert Path(ckpt).name == "last.ckpt"  # defense=gaussian selects the last epoch
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["medrobust_config"]
    assert stored["defense"]["sigma"] == 0.25  # sigma travels in the checkpoint
    report = evaluate(_certify_cfg(ckpt, tmp_path / "a"))
    block = report["certify"]
    assert block["sigma"] == 0.25 and block["sigma_source"].startswith("checkpoint")
    assert (block["n0"], block["n"], block["alpha"]) == (20, 200, 0.001)
    assert block["n_images"] == report["n_images"] == 12
    acc = list(block["certified_acc"].values())
    assert list(block["certified_acc"]) == ["0", "0.25", "0.5", "1"]
    assert acc == sorted(acc, reverse=True) and 0 <= acc[-1] <= acc[0] <= 1
    assert list(block["certified_bal_acc"]) == list(block["certified_acc"])
    assert 0.25 <= block["majority_share"] <= 1
    assert 0 <= block["abstain_rate"] <= 1 and block["average_certified_radius"] >= 0
    assert acc[0] + block["abstain_rate"] <= 1 + 1e-9
    assert set(block["empirical_smoothed"]) == {"0.25", "0.5", "1"}
    assert block["seconds_per_image"] > 0
    # the base classifier's L2 rows at the same radii, and the check
    assert {(r["norm"], r["eps_str"]) for r in report["results"]} == {
        ("l2", "0"), ("l2", "0.25"), ("l2", "0.5"), ("l2", "1")}
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["certified_not_above_empirical"]["passed"], checks
    out = Path(report["output_dir"])
    assert (out / "certified_accuracy.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## Certified robustness" in text and "| 0.5 |" in text
    assert EvalReport.load(out / "report.json").certify == json.loads(
        (out / "report.json").read_text())["certify"]
    # seeded: the same command gives the same certificates
    again = evaluate(_certify_cfg(ckpt, tmp_path / "b"))["certify"]
    assert again["certified_acc"] == block["certified_acc"] and again["curve"] == block["curve"]
    # a check built to trip shows as a FAILED line in report.md
    tripped = dict(report, checks=[c.as_dict() for c in certify_checks(
        {"certified_acc": {"0.5": 1.0}, "empirical_smoothed": {"0.5": {"acc": 0.0,
                                                                       "undecided": 0.0}}},
        12)])
    assert "**FAILED** certified_not_above_empirical" in summary_markdown(tripped)
    # sigma overridden: the report says where it came from
    other = evaluate(_certify_cfg(ckpt, tmp_path / "c", "evaluation.certify.sigma=0.5",
                                  "evaluation.certify.radii=[0,0.5]"))["certify"]
    assert other["sigma"] == 0.5 and other["sigma_source"] == "evaluation.certify.sigma"
    assert math.isclose(sum(1 for _ in other["certified_acc"]), 2)


def test_certify_refuses_a_checkpoint_without_sigma(tmp_path):
    cfg = compose_cfg("train", [*FAST, "backbone.width=8", "defense=none",
                                "trainer.limit_train_batches=1"], tmp_path / "run")
    ckpt = train(cfg)["best_checkpoint"]
    with pytest.raises(ConfigError, match="evaluation.certify.sigma is null.*defense \\(none\\)"):
        evaluate(_certify_cfg(ckpt, tmp_path / "e"))


def test_killed_certification_resumes_from_its_saved_batches(gaussian_run, tmp_path,
                                                             monkeypatch):
    ckpt = gaussian_run["best_checkpoint"]
    extra = ["+datamodule.eval_batch_size=4"]
    fresh = evaluate(_certify_cfg(ckpt, tmp_path / "f", *extra))["certify"]
    real, calls = Certifier.run, []

    def dies_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Certifier, "run", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(_certify_cfg(ckpt, tmp_path / "r", *extra))
    assert len(list((tmp_path / "r" / "partial").glob("rank0-batch*.pt"))) == 1
    monkeypatch.setattr(Certifier, "run", real)
    resumed = evaluate(_certify_cfg(ckpt, tmp_path / "r", *extra))
    assert resumed["resumed_batches"] == 1 and resumed["certify"]["n_images"] == 12
    # every image's noise comes from its own generator: the certificates are the same
    for key in ("certified_acc", "average_certified_radius", "abstain_rate",
                "smoothed_clean_acc", "curve"):
        assert resumed["certify"][key] == fresh[key], key


@pytest.mark.slow
def test_cli_certify_ddp_sim_certifies_each_image_once_as_one_process(gaussian_run, tmp_path):
    """Two DDP processes shard 13 images; each image is certified once, with the noise of its
    own index, so the certificates are those of one process."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    common = [str(ROOT / "evaluate.py"), f"ckpt_path={gaussian_run['best_checkpoint']}",
              "evaluation=certify", "evaluation.certify.n0=20", "evaluation.certify.n=200",
              "evaluation.certify.attack.steps=2", "evaluation.certify.attack_samples=2",
              "attacks.pgd.steps=2", "trainer.enable_progress_bar=false",
              "+datamodule.n_test=13", "+datamodule.eval_batch_size=4",
              f"paths.log_dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    blocks = {}
    for name, extra in (("one", []), ("ddp", ["trainer=ddp_sim"])):
        proc = subprocess.run([sys.executable, *common, *extra,
                               f"output_dir={tmp_path / name}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        blocks[name] = json.loads((tmp_path / name / "report.json").read_text())["certify"]
    assert blocks["one"]["n_images"] == blocks["ddp"]["n_images"] == 13
    for key in ("certified_acc", "average_certified_radius", "abstain_rate",
                "smoothed_clean_acc", "predict_abstain_rate"):
        assert blocks["ddp"][key] == pytest.approx(blocks["one"][key], abs=1e-12), key
