"""Grouped splits with few groups (a 6-base subset of Messidor, 100 images a base): whole
groups assigned as close to val_fraction/test_fraction as they allow, the fractions reached in
one warning line, and one error line whose hint works when there are too few groups."""

from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import pytest

from datamodules import from_config
from datamodules.splits import split_indices
from tests import layouts

LOADER = {"image_size": 16, "num_workers": 0, "batch_size": 8}
SIX = layouts.MESSIDOR_BASES[:6]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def six_bases(tmp_path_factory):
    return layouts.write_messidor(tmp_path_factory.mktemp("six") / "messidor", per_base=100,
                                  bases=SIX)


def _bases(dm) -> dict[str, list[str]]:
    groups = np.asarray(dm.table.groups)
    return {s: sorted(set(groups[dm.split_idx[s]].tolist())) for s in SPLITS}


def _split_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "whole groups assigned" in r.getMessage()]


def test_six_bases_whole_groups_4_1_1_and_fractions_reached(six_bases, caplog):
    with caplog.at_level(logging.WARNING, logger="medrobust.data"):
        dm = from_config("messidor", data_dir=str(six_bases), val_fraction=0.1,
                         test_fraction=0.2, **LOADER)
    bases = _bases(dm)
    assert [len(bases[s]) for s in SPLITS] == [4, 1, 1]
    assert sorted(b for s in SPLITS for b in bases[s]) == sorted(SIX)  # each base in one split
    groups = np.asarray(dm.table.groups)
    for s in SPLITS:  # every image of a split's bases is in that split: no base is cut
        assert dm.split_idx[s].tolist() == np.flatnonzero(np.isin(groups, bases[s])).tolist()
    assert {s: len(dm.split_idx[s]) for s in SPLITS} == {"train": 400, "val": 100, "test": 100}
    (line,) = _split_lines(caplog)
    assert "6 patient/lesion groups (600 images)" in line
    assert "train 4 group(s), 400 images, fraction 0.67 (asked 0.70)" in line
    assert "val 1 group(s), 100 images, fraction 0.17 (asked 0.10)" in line
    assert "test 1 group(s), 100 images, fraction 0.17 (asked 0.20)" in line


def test_six_bases_with_the_config_defaults_seeded(six_bases):
    """The user's run: datamodule=messidor as configured (val 0.15, test 0.2) used to stop."""
    dm = from_config("messidor", data_dir=str(six_bases), **LOADER)
    assert [len(v) for v in _bases(dm).values()] == [4, 1, 1]
    again = from_config("messidor", data_dir=str(six_bases), **LOADER)
    assert _bases(again) == _bases(dm)  # same seed, same bases
    held = {tuple(_bases(from_config("messidor", data_dir=str(six_bases), seed=seed,
                                     **LOADER))["val"]) for seed in range(4)}
    assert len(held) > 1  # equal bases: the seed picks which


def _cost(sizes, assignment, target) -> float:
    counts = np.bincount(assignment, weights=sizes, minlength=len(target))
    return float(np.abs(counts - target).sum())


@pytest.mark.parametrize("case", range(6))
def test_unequal_groups_as_close_as_the_groups_allow(case, caplog):
    """Against every assignment of whole groups with no split empty (brute force)."""
    rng = np.random.default_rng(case)
    sizes = rng.integers(1, 40, size=int(rng.integers(4, 8)))
    groups = np.repeat(np.arange(len(sizes)), sizes)
    labels = np.arange(len(groups)) % 2
    n = len(groups)
    target = np.array([0.75 * n, 0.1 * n, 0.15 * n])
    with caplog.at_level(logging.WARNING, logger="medrobust.data"):
        out = split_indices(labels, groups, 0.1, 0.15, seed=case)
    assert len(_split_lines(caplog)) == 1  # the few-groups path, not StratifiedGroupKFold
    split_of = {int(g): s for s, name in enumerate(SPLITS) for g in set(groups[out[name]])}
    assert len(split_of) == len(sizes)  # no group in two splits, none left out
    assert sum(len(v) for v in out.values()) == n
    got = _cost(sizes, np.array([split_of[g] for g in range(len(sizes))]), target)
    best = min(_cost(sizes, np.array(a), target)
               for a in itertools.product(range(3), repeat=len(sizes)) if len(set(a)) == 3)
    assert got == pytest.approx(best)


def test_many_groups_keep_stratified_folds(caplog):
    """Groups enough for folds: StratifiedGroupKFold as before, no whole-groups line."""
    groups = np.repeat(np.arange(60), 3)
    labels = groups % 3
    with caplog.at_level(logging.WARNING, logger="medrobust.data"):
        out = split_indices(labels, groups, 0.15, 0.15, seed=0)
    assert not _split_lines(caplog)
    assert all(len(set(groups[out[s]])) > 5 for s in ("val", "test"))


def test_too_few_groups_one_line_with_a_hint_that_works(tmp_path):
    two = layouts.write_messidor(tmp_path / "two", per_base=12, bases=SIX[:2])
    with pytest.raises(ValueError) as err:
        from_config("messidor", data_dir=str(two), **LOADER)
    msg = str(err.value)
    assert "\n" not in msg
    assert ("cannot split 24 images in 2 patient/lesion group(s) into train/val/test: need at "
            "least 3 groups for train/val/test") in msg
    assert "add data" in msg and "lower fractions do not help" in msg
    # lower fractions indeed do not help: 0 is refused, and a small one still needs 3 groups
    with pytest.raises(ValueError, match=r"val_fraction=0.0 must be in \(0, 1\)"):
        from_config("messidor", data_dir=str(two), val_fraction=0.0, **LOADER)
    with pytest.raises(ValueError, match="need at least 3 groups"):
        from_config("messidor", data_dir=str(two), val_fraction=0.01, test_fraction=0.01,
                    **LOADER)
    # the hint works: a third base
    three = layouts.write_messidor(tmp_path / "three", per_base=12, bases=SIX[:3])
    dm = from_config("messidor", data_dir=str(three), **LOADER)
    assert [len(v) for v in _bases(dm).values()] == [1, 1, 1]
    # train/val only (the test split fixed elsewhere) needs 2 groups, and 1 is too few
    groups = np.repeat(["a", "b"], 5)
    out = split_indices(np.zeros(10, int), groups, 0.2, None, seed=0)
    assert sorted(out) == ["train", "val"] and all(len(set(groups[v])) == 1 for v in out.values())
    with pytest.raises(ValueError, match=r"need at least 2 groups for train/val"):
        split_indices(np.zeros(10, int), np.zeros(10, int), 0.2, None, seed=0)


def test_fraction_asking_for_no_image_one_line_with_a_hint_that_works(six_bases):
    """val 0.0005 of 600 images asks for an empty split: an error whose suggested fraction then
    gives one base (as close to it as whole bases allow)."""
    with pytest.raises(ValueError) as err:
        from_config("messidor", data_dir=str(six_bases), val_fraction=0.0005, **LOADER)
    msg = str(err.value)
    assert "\n" not in msg and "datamodule.val_fraction=0.0005" in msg
    least = float(re.search(r"raise datamodule.val_fraction to at least ([0-9.]+)", msg)[1])
    assert least == 0.01  # half an image of 600, rounded up
    dm = from_config("messidor", data_dir=str(six_bases), val_fraction=least, **LOADER)
    assert [len(v) for v in _bases(dm).values()] == [4, 1, 1]
