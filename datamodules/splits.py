"""Train/validation/test splits: stratified by label, grouped by patient or lesion."""

from __future__ import annotations

import numpy as np

__all__ = ["split_indices", "stratified_subset", "merge_groups"]


def _surrogate_labels(labels: np.ndarray) -> np.ndarray:
    """Class labels for stratification; multi-hot rows map to their rarest positive finding."""
    if labels.ndim == 1:
        return labels
    freq = labels.sum(axis=0)
    order = np.where(labels > 0, freq[None, :], np.inf)
    surrogate = order.argmin(axis=1)
    surrogate[~(labels > 0).any(axis=1)] = labels.shape[1]  # no finding
    return surrogate


def _one_fold(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1.0 / fraction))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise ValueError(f"cannot split {len(idx)} images in {n_groups} patient/lesion groups "
                         f"into folds of about {fraction:.2f}: need at least {n_splits} groups "
                         "(add data, or lower datamodule.val_fraction/test_fraction)")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only k members" on tiny data
        warnings.simplefilter("ignore", UserWarning)
        try:
            keep, held = next(sgkf.split(idx, _surrogate_labels(labels[idx]), groups[idx]))
        except ValueError as err:
            raise ValueError(f"cannot split {len(idx)} images into stratified folds of about "
                             f"{fraction:.2f} ({err}); add data or raise "
                             "datamodule.val_fraction/test_fraction") from err
    return idx[keep], idx[held]


def split_indices(labels: np.ndarray, groups: np.ndarray | None, val_fraction: float,
                  test_fraction: float | None, seed: int,
                  rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Stratified, group-disjoint train/val(/test) row indices (``StratifiedGroupKFold``).

    ``labels`` are class indices ``(N,)`` or multi-hot ``(N, K)`` (stratified on each row's
    rarest finding). ``groups`` (patient or lesion ids; ``None`` = every row its own group)
    never straddle two splits. Fractions are approximate (folds hold whole groups). Only
    ``rows`` (default all) are split; ``test_fraction=None`` gives train and val only.
    """
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if frac is not None and not 0.0 < frac < 1.0:
            raise ValueError(f"datamodule.{key}={frac} must be in (0, 1)")
    if test_fraction is not None and val_fraction + test_fraction >= 1.0:
        raise ValueError("datamodule.val_fraction + datamodule.test_fraction must be < 1")
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    rest = np.arange(len(labels)) if rows is None else np.asarray(rows)
    out: dict[str, np.ndarray] = {}
    if test_fraction is not None:
        rest, out["test"] = _one_fold(rest, labels, groups, test_fraction, seed)
        val_fraction = val_fraction / (1.0 - test_fraction)
    out["train"], out["val"] = _one_fold(rest, labels, groups, val_fraction, seed + 1)
    return {k: np.sort(v) for k, v in out.items()}


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` samples with the class proportions
    of ``labels`` (multi-label rows: by their rarest positive finding), at least one sample
    of every class present; ``n >= len(labels)`` returns every index."""
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    surrogate = _surrogate_labels(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(surrogate, return_counts=True)
    # largest remainder apportionment of n over the classes, each class at least 1
    quota = counts * n / total
    take = np.maximum(1, np.floor(quota).astype(int))
    for i in np.argsort(-(quota - np.floor(quota))):
        if take.sum() >= n:
            break
        if take[i] < counts[i]:
            take[i] += 1
    picked = [rng.choice(np.flatnonzero(surrogate == c), size=min(k, cnt), replace=False)
              for c, k, cnt in zip(classes, take, counts, strict=True)]
    return np.sort(np.concatenate(picked))


def merge_groups(groups: np.ndarray, links) -> np.ndarray:
    """``groups`` with every pair of ids in ``links`` (e.g. the two lesions an image is listed
    under) merged into one group, transitively; each merged group takes one of its ids."""
    parent: dict = {}

    def root(a):
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra
    if not parent:
        return groups
    return np.array([root(g) for g in groups], dtype=object if groups.dtype == object
                    else groups.dtype)
