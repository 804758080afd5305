"""Discriminability of learned features, clean against adversarial (Xu et al., MedIA 2021):
a 2-D t-SNE map, the silhouette score of the classes, and the cross-validated accuracy of a
linear probe (logistic regression), all from scikit-learn and seeded."""

from __future__ import annotations

import numpy as np

__all__ = ["discriminability", "tsne_2d"]


def discriminability(features: np.ndarray, labels: np.ndarray, seed: int = 0,
                     folds: int = 5) -> dict[str, float | None]:
    """``silhouette`` (in [-1, 1], Euclidean, of the class labels), ``probe_acc`` and
    ``probe_bal_acc`` (mean ``folds``-fold stratified cross-validated accuracy and balanced
    accuracy of a standardised logistic regression with class-balanced weights, so that on
    imbalanced data such as HAM10000 the probe asks whether the classes separate, not how
    common the majority class is; balanced accuracy is near 1 / classes when the features
    carry nothing). ``None`` where the data cannot support it (one class, or a class
    with fewer samples than folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return {"silhouette": None, "probe_acc": None, "probe_bal_acc": None}
    sil = float(silhouette_score(feats, y)) if len(classes) < len(y) else None
    k = min(folds, int(counts.min()))
    probe = bal = None
    if k >= 2:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000,
                                                                 class_weight="balanced"))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        scores = cross_validate(clf, feats, y, cv=cv, scoring=("accuracy", "balanced_accuracy"))
        probe = float(scores["test_accuracy"].mean())
        bal = float(scores["test_balanced_accuracy"].mean())
    return {"silhouette": sil, "probe_acc": probe, "probe_bal_acc": bal}


def tsne_2d(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``(N, 2)`` t-SNE embedding (PCA initialisation, seeded; perplexity capped below N)."""
    from sklearn.manifold import TSNE

    feats = np.asarray(features, dtype=np.float64)
    perp = max(1.0, min(perplexity, (len(feats) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed
                ).fit_transform(feats)
