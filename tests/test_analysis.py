"""The second study's analyses (issue 11) as plain functions: feature distances, the
discriminability numbers, finding co-occurrence and correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.attacks import attack_from_config
from lightning_modules.evaluation.analysis import (
    ANALYSES,
    cooccurrence,
    correlation_distance,
    discriminability,
    feature_stages,
    penultimate_features,
    prediction_correlation,
    relative_feature_distance,
    run_analyses,
    tsne_2d,
)
from lightning_modules.models.backbones import small_cnn, timm_model


def test_feature_stages_of_the_small_cnn_and_a_timm_model():
    assert list(feature_stages(small_cnn(4, width=8))) == ["block1", "block2", "block3",
                                                           "pooled"]
    net = timm_model("resnet18", num_classes=3, pretrained=False)
    stages = feature_stages(net)
    assert list(stages)[-1] == "layer4" and len(stages) == 5


def test_feature_distance_zero_for_equal_inputs_and_grows_under_attack(trained_model):
    model, x, y = trained_model
    x = x[:32]
    same = relative_feature_distance(model, x, x.clone())
    assert list(same) == ["block1", "block2", "block3", "pooled"]
    assert all(v == 0.0 for v in same.values())
    x_adv = attack_from_config("pgd", eps=8 / 255, steps=10)(model, x, y[:32])
    dist = relative_feature_distance(model, x, x_adv)
    assert all(v > 0 for v in dist.values())
    noise = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)
    # the attack moves the deep features more than random noise of the same size
    assert dist["pooled"] > relative_feature_distance(model, x, noise)["pooled"]


def test_penultimate_features_shapes(trained_model):
    model, x, _ = trained_model
    assert penultimate_features(model, x[:10]).shape == (10, 32)  # width 8 -> 4 * 8
    net = timm_model("resnet18", num_classes=3, pretrained=False).eval()
    assert penultimate_features(net, torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_discriminability_identical_inputs_identical_numbers_and_separable_beats_mixed():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    separable = rng.normal(size=(60, 8)) + 5 * np.eye(3, 8)[y]
    a, b = discriminability(separable, y, seed=0), discriminability(separable.copy(), y, seed=0)
    assert a == b and a["probe_acc"] > 0.9 and a["silhouette"] > 0.3
    assert a["probe_bal_acc"] > 0.9
    mixed = discriminability(rng.normal(size=(60, 8)), y, seed=0)
    assert mixed["probe_acc"] < a["probe_acc"] and mixed["silhouette"] < a["silhouette"]
    assert discriminability(separable, np.zeros(60), seed=0) == {
        "silhouette": None, "probe_acc": None, "probe_bal_acc": None}
    # imbalanced (9:1): noise features give a balanced accuracy near 1/2, separable ones
    # near 1, whatever the majority share
    y_imb = np.r_[np.zeros(90, int), np.ones(10, int)]
    noise = discriminability(rng.normal(size=(100, 4)), y_imb, seed=0)
    sep = discriminability(rng.normal(size=(100, 4)) + 4 * y_imb[:, None], y_imb, seed=0)
    assert noise["probe_bal_acc"] < 0.65 and sep["probe_bal_acc"] > 0.9
    emb = tsne_2d(separable, seed=0)
    assert emb.shape == (60, 2) and np.allclose(emb, tsne_2d(separable, seed=0))


def test_cooccurrence_matches_a_hand_count():
    y = np.array([[1, 1, 0],   # findings 0 and 1
                  [1, 0, 0],   # 0 alone
                  [1, 0, 0],   # 0 alone
                  [0, 1, 1],   # 1 and 2
                  [0, 0, 0]])  # none
    assert cooccurrence(y).tolist() == [[2, 1, 0],
                                        [1, 0, 1],
                                        [0, 1, 0]]


def test_prediction_correlation_and_distance():
    y = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
    corr = prediction_correlation(y)
    assert corr[0, 1] == pytest.approx(1.0) and corr[0, 2] == 0.0 and corr[2, 2] == 1.0
    flipped = y.copy()
    flipped[:, 1] = 1 - flipped[:, 1]
    assert prediction_correlation(flipped)[0, 1] == pytest.approx(-1.0)
    assert correlation_distance(corr, corr) == 0.0
    assert correlation_distance(corr, prediction_correlation(flipped)) == pytest.approx(
        np.sqrt(8.0))


def test_each_analysis_runs_on_its_own_by_name(trained_model, tmp_path):
    from lightning_modules.core.tasks import Task

    model, x, y = trained_model
    pgd = {"pgd": attack_from_config("pgd", eps=8 / 255, steps=2, norm="linf")}
    only = run_analyses(model, x[:24], y[:24], Task("multiclass"), 4, pgd, tmp_path / "f",
                        which=["features"])
    assert only["which"] == ["features"] and set(only["files"]) == {"feature_distance"}
    assert "discriminability" not in only and "confusion" not in only
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["feature_distance.png"]
    labels = run_analyses(model, x[:24], y[:24], Task("multiclass"), 4, pgd, tmp_path / "l",
                          which=["labels"])
    assert set(labels["files"]) == {"confusion"} and "feature_distance" not in labels
    assert sum(map(sum, labels["confusion"]["clean"])) == 24
    assert set(ANALYSES) == {"features", "discriminability", "labels", "examples"}
    with pytest.raises(ValueError, match="unknown analyses"):
        run_analyses(model, x, y, Task("multiclass"), 4, pgd, tmp_path, which=["tsne"])
