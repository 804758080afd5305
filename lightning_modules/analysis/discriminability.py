"""Discriminability of learned features, clean against adversarial (Xu et al., MedIA 2021):
a 2-D t-SNE map, the silhouette score of the classes, and the cross-validated accuracy of a
linear probe (logistic regression), all from scikit-learn and seeded."""

from __future__ import annotations

import numpy as np

__all__ = ["discriminability", "tsne_2d"]


def discriminability(features: np.ndarray, labels: np.ndarray, seed: int = 0,
                     folds: int = 5) -> dict[str, float | None]:
    """``silhouette`` (in [-1, 1], Euclidean, of the class labels) and ``probe_acc`` (mean
    ``folds``-fold stratified cross-validated accuracy of a standardised logistic regression).
    ``None`` where the data cannot support it (one class, or a class with fewer samples than
    folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return {"silhouette": None, "probe_acc": None}
    sil = float(silhouette_score(feats, y)) if len(classes) < len(y) else None
    k = min(folds, int(counts.min()))
    probe = None
    if k >= 2:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        probe = float(cross_val_score(clf, feats, y, cv=cv).mean())
    return {"silhouette": sil, "probe_acc": probe}


def tsne_2d(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``(N, 2)`` t-SNE embedding (PCA initialisation, seeded; perplexity capped below N)."""
    from sklearn.manifold import TSNE

    feats = np.asarray(features, dtype=np.float64)
    perp = max(1.0, min(perplexity, (len(feats) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed
                ).fit_transform(feats)
