"""Train/validation/test splits: stratified by label, grouped by patient or lesion."""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["split_indices", "stratified_subset", "merge_groups"]

log = logging.getLogger("medrobust.data")


class _TooFewGroups(ValueError):
    """Fewer groups than stratified folds of the asked fraction: :func:`_whole_groups` takes over."""


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
        raise _TooFewGroups(f"{n_groups} groups for folds of about {fraction:.2f} "
                            f"(need {n_splits})")  # caught by split_indices
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
    With too few groups for folds of the fractions (e.g. 6 image bases), whole groups are
    assigned to come as close to the fractions as they allow, not stratified, with a warning
    giving the fractions reached (:func:`_whole_groups`).
    """
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if frac is not None and not 0.0 < frac < 1.0:
            raise ValueError(f"datamodule.{key}={frac} must be in (0, 1)")
    if test_fraction is not None and val_fraction + test_fraction >= 1.0:
        raise ValueError("datamodule.val_fraction + datamodule.test_fraction must be < 1")
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    try:
        out = _stratified_folds(rows, labels, groups, val_fraction, test_fraction, seed)
    except _TooFewGroups:
        out = _whole_groups(rows, groups, val_fraction, test_fraction, seed)
    return {k: np.sort(v) for k, v in out.items()}


def _stratified_folds(rows: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                      val_fraction: float, test_fraction: float | None,
                      seed: int) -> dict[str, np.ndarray]:
    """The split when there are groups enough for folds of the fractions: a test fold, then a
    validation fold of the rest (``StratifiedGroupKFold``)."""
    out: dict[str, np.ndarray] = {}
    rest = rows
    if test_fraction is not None:
        rest, out["test"] = _one_fold(rest, labels, groups, test_fraction, seed)
        val_fraction = val_fraction / (1.0 - test_fraction)
    out["train"], out["val"] = _one_fold(rest, labels, groups, val_fraction, seed + 1)
    return out


def _whole_groups(rows: np.ndarray, groups: np.ndarray, val_fraction: float,
                  test_fraction: float | None, seed: int) -> dict[str, np.ndarray]:
    """The split when there are too few groups for stratified folds of the fractions (e.g. 6
    image bases): whole groups assigned so that each split's image count is as close to its
    fraction of ``rows`` as the groups allow (:func:`_assign_groups`; ties broken by
    ``seed``), every split at least one group. Not stratified. One warning line gives the
    fraction each split reached.

    Raises ``ValueError`` (one line) when there are fewer groups than splits, or when a
    fraction asks for an empty split (under half an image)."""
    names = ["train", "val"] + (["test"] if test_fraction is not None else [])
    asked = {"val": val_fraction, "test": test_fraction}
    ids, inverse, sizes = np.unique(groups[rows], return_inverse=True, return_counts=True)
    n, n_groups, k = len(rows), len(ids), len(names)
    if n_groups < k:
        raise ValueError(
            f"cannot split {n} images in {n_groups} patient/lesion group(s) into "
            f"{'/'.join(names)}: need at least {k} groups for {'/'.join(names)}, one whole group "
            "per split (no split may be empty, so lower fractions do not help); add data from "
            "more groups (patients, lesions, image bases)")
    for name in names[1:]:
        if n * asked[name] < 0.5:
            least = math.ceil(0.5 / n * 100) / 100
            raise ValueError(
                f"cannot split {n} images in {n_groups} patient/lesion groups with "
                f"datamodule.{name}_fraction={asked[name]}: it asks for {n * asked[name]:.2f} "
                f"images, an empty {name} split; raise datamodule.{name}_fraction to at least "
                f"{least:.2f}")
    target = np.array([n * (1.0 - sum(asked[s] for s in names[1:]))]
                      + [n * asked[s] for s in names[1:]])
    order = np.random.default_rng(seed).permutation(n_groups)  # ties: seeded
    split_of_group = np.empty(n_groups, dtype=int)
    split_of_group[order] = _assign_groups(sizes[order].astype(float), target)
    out = {name: rows[split_of_group[inverse] == s] for s, name in enumerate(names)}
    reached = "; ".join(
        f"{name} {int((split_of_group == s).sum())} group(s), {len(out[name])} images, "
        f"fraction {len(out[name]) / n:.2f} (asked {target[s] / n:.2f})"
        for s, name in enumerate(names))
    log.warning("%d patient/lesion groups (%d images) are too few for stratified folds of "
                "val_fraction=%s, test_fraction=%s: whole groups assigned (not stratified): %s",
                n_groups, n, val_fraction, test_fraction, reached)
    return out


def _assign_groups(size: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The split (index into ``target``) of each group of ``size`` images that brings the
    splits' image counts closest to ``target`` (least total absolute difference), no split
    empty; ties go to the first assignment in ``size`` order. Exact (every assignment tried)
    up to 600,000 assignments, e.g. 12 groups in 3 splits; beyond, the best found by moving
    and swapping single groups from a start where each held-out split holds the group nearest
    its target."""
    k, n_groups = len(target), len(size)
    if k ** n_groups <= 600_000:
        code = np.arange(k ** n_groups)
        count = np.zeros((k, len(code)))
        members = np.zeros((k, len(code)), dtype=np.int32)
        for g in range(n_groups):
            digit = code // k ** g % k
            for s in range(k):
                count[s] += (digit == s) * size[g]
                members[s] += digit == s
        cost = np.abs(count - target[:, None]).sum(axis=0)
        cost[(members == 0).any(axis=0)] = np.inf
        return int(cost.argmin()) // k ** np.arange(n_groups) % k
    where = np.zeros(n_groups, dtype=int)  # 0 = the first split (train)
    for s in range(1, k):
        free = np.flatnonzero(where == 0)
        where[free[np.argmin(np.abs(size[free] - target[s]))]] = s
    for _ in range(10 * n_groups):
        count = np.bincount(where, weights=size, minlength=k)
        err = np.abs(count - target)
        members = np.bincount(where, minlength=k)
        a, b = where[:, None], np.arange(k)[None, :]  # move group g from split a to split b
        move = (np.abs(count[a] - size[:, None] - target[a]) - err[a]
                + np.abs(count[b] + size[:, None] - target[b]) - err[b])
        move[(a == b) | (members[a] == 1)] = np.inf
        c, d = where[None, :], size[None, :] - size[:, None]  # swap g (in a) and h (in c)
        swap = (np.abs(count[a] + d - target[a]) - err[a]
                + np.abs(count[c] - d - target[c]) - err[c])
        swap[a == c] = np.inf
        if min(move.min(), swap.min()) > -1e-9:
            break
        if move.min() <= swap.min():
            g, s = np.unravel_index(move.argmin(), move.shape)
            where[g] = s
        else:
            g, h = np.unravel_index(swap.argmin(), swap.shape)
            where[g], where[h] = where[h], where[g]
    return where


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
