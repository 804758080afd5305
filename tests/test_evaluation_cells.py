"""The evaluation grid as typed cells (attack, norm, eps, worst-case group), the report rows
built from them, and the honesty check that bounds each worst case by its own group."""

from __future__ import annotations

from lightning_modules.attacks import attack_from_config
from lightning_modules.evaluation.honesty import report_checks
from lightning_modules.evaluation.module import grid_cells, worst_case_groups
from lightning_modules.evaluation.schema import Cell, ResultRow


def test_grid_cells_are_typed_and_worst_cases_group_one_threat_model():
    cells = grid_cells({"fgsm": attack_from_config("fgsm", eps=0),
                        "pgd": attack_from_config("pgd", eps=0)}, [0, 8 / 255])
    assert set(cells) == {"fgsm@0", "pgd@0", "fgsm@8/255", "pgd@8/255", "worst@8/255"}
    assert cells["pgd@8/255"] == Cell("pgd", "linf", 8 / 255, "worst")
    assert cells["pgd@0"] == Cell("pgd", "linf", 0.0, None)  # no worst case at eps 0
    assert cells["worst@8/255"].worst and not cells["pgd@8/255"].worst
    assert worst_case_groups(cells) == {"worst@8/255": ["fgsm@8/255", "pgd@8/255"]}
    mixed = grid_cells({"fgsm": attack_from_config("fgsm", eps=0),
                        "pgd": attack_from_config("pgd", eps=0),
                        "pgd_l2": attack_from_config("pgd", eps=0, norm="l2"),
                        "fgsm_l2": attack_from_config("fgsm", eps=0, norm="l2")}, [0.5])
    assert worst_case_groups(mixed) == {"worst-l2@0.5": ["pgd_l2@0.5", "fgsm_l2@0.5"],
                                        "worst-linf@0.5": ["fgsm@0.5", "pgd@0.5"]}
    assert mixed["worst-l2@0.5"] == Cell("worst-l2", "l2", 0.5, "worst-l2")


def test_rows_are_built_from_cells_and_read_back():
    cell = Cell("pgd", "linf", 2 / 255, "worst")
    row = ResultRow.from_cell(cell, {"acc": 0.5}, {"seconds": 1.5, "images_attacked": 8},
                              {"steps": 20, "restarts": 1})
    assert (row.attack, row.eps_str, row.steps, row.seconds, row.group, row.worst) == \
        ("pgd", "2/255", 20, 1.5, "worst", False)
    again = ResultRow.from_dict(row.as_dict())
    assert again == row
    worst = ResultRow.from_cell(Cell("worst", "linf", 2 / 255, "worst"), {"acc": 0.4}, None, None)
    assert worst.worst and worst.steps is None
    # a schema-2 row (no group) named worst-<norm> is read as a worst case
    old = {k: v for k, v in worst.as_dict().items() if k != "group"}
    assert ResultRow.from_dict({**old, "attack": "worst-l2"}).worst


def _row(attack, norm, eps, group, acc):
    return ResultRow.from_cell(Cell(attack, norm, eps, group), {"acc": acc}, None, None).as_dict()


def test_worst_case_check_fires_for_a_per_norm_group():
    clean = {"acc": 0.9}
    rows = [_row("pgd", "linf", 0.5, "worst-linf", 0.5), _row("fgsm", "linf", 0.5, "worst-linf", 0.6),
            _row("worst-linf", "linf", 0.5, "worst-linf", 0.5),
            _row("pgd_l2", "l2", 0.5, "worst-l2", 0.3), _row("fgsm_l2", "l2", 0.5, "worst-l2", 0.4),
            _row("worst-l2", "l2", 0.5, "worst-l2", 0.3)]
    ok = {c.check: c for c in report_checks(clean, rows, 100)}
    # the L-inf worst case (0.5) is above the L2 attacks (0.3): another group, not compared
    assert ok["worst_case_not_above_attacks"].passed
    rows[-1]["acc"] = 0.35  # now above pgd_l2 (0.3) of its own group: must fail
    bad = {c.check: c for c in report_checks(clean, rows, 100)}
    assert not bad["worst_case_not_above_attacks"].passed
    assert "worst-l2 acc 0.3500 > pgd_l2 0.3000 @ 0.5" in bad["worst_case_not_above_attacks"].detail
