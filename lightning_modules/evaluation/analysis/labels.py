"""Label correlation for multi-label tasks (Xu et al., MedIA 2021): how often findings occur
together, and how predicted findings correlate, for the ground truth, clean and adversarial
predictions."""

from __future__ import annotations

import numpy as np

__all__ = ["cooccurrence", "prediction_correlation", "correlation_distance"]


def cooccurrence(labels: np.ndarray) -> np.ndarray:
    """``(K, K)`` counts from ``(N, K)`` 0/1 labels, as the study's released code counts them:
    off-diagonal ``[i, j]`` = images with both findings ``i`` and ``j``; diagonal ``[i, i]`` =
    images with finding ``i`` alone (no other finding)."""
    y = (np.asarray(labels) > 0).astype(np.int64)
    both = y.T @ y
    alone = (y * (y.sum(axis=1, keepdims=True) == 1)).sum(axis=0)
    out = both.copy()
    np.fill_diagonal(out, alone)
    return out


def prediction_correlation(labels: np.ndarray) -> np.ndarray:
    """``(K, K)`` Pearson correlation between findings over images (0 where a finding is
    constant, 1 on the diagonal)."""
    y = (np.asarray(labels) > 0).astype(np.float64)
    centred = y - y.mean(axis=0, keepdims=True)
    std = np.sqrt((centred ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (centred.T @ centred) / np.outer(std, std)
    corr = np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def correlation_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frobenius distance between two correlation matrices (0 = the same structure)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b), ord="fro"))
