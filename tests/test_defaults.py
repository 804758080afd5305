"""Each default has one home: the YAML of ``conf/``. The classes it configures (attacks,
defenses, the LightningModule, callbacks) take every configured option as a required argument,
and every option is in its YAML (so ``group.key=...`` works without ``+``). The datamodules'
counterpart is ``tests/test_configs.py::test_datamodule_defaults_live_in_one_place``."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from lightning_modules.attacks import attack_config
from tests.conftest import CONF, ROOT, compose_cfg

# arguments the code passes itself, never configured
INJECTED = {
    "RobustClassifier": {"net", "defense", "val_attack", "class_names", "class_weights"},
    "GAP": {"generator"},            # set after fitting (with_generator)
    "ResumeState": {"seed"},         # the run's seed, set by train.py
}


def _check(target: str, keys: set[str], where: str) -> None:
    cls = get_class(target)
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    injected = INJECTED.get(cls.__name__, set())
    defaults = sorted(n for n, p in params.items()
                      if p.default is not inspect.Parameter.empty and n not in injected)
    assert not defaults, f"{where}: {cls.__name__} has defaults in code for {defaults}"
    configured = set(params) - injected
    assert keys - injected == configured, \
        f"{where}: in YAML only {sorted(keys - set(params))}, in code only " \
        f"{sorted(configured - keys)}"


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("name", _names("attack"))
def test_attack_options_live_in_their_yaml(name):
    node = attack_config(name)
    _check(node._target_, set(node) - {"_target_"}, f"conf/attack/{name}.yaml")


@pytest.mark.parametrize("name", _names("defense"))
def test_defense_options_live_in_their_yaml(name, tmp_path):
    cfg = compose_cfg("train", [f"defense={name}"], tmp_path)
    node = cfg.defense
    # selection and averaging are train.py's (base/defaults): the checkpoint it tests and the
    # weight_averaging callback it mounts
    keys = set(node) - {"_target_", "selection", "averaging"}
    _check(node._target_, keys, f"conf/defense/{name}.yaml")


def test_module_and_callback_options_live_in_their_yaml(tmp_path):
    cfg = compose_cfg("train", ["logger=wandb"], tmp_path)
    _check(cfg.module._target_, set(cfg.module) - {"_target_"}, "conf/module/default.yaml")
    ours = {k: v for k, v in cfg.callbacks.items()
            if str(v.get("_target_", "")).startswith("lightning_modules.")}
    assert {"resume", "co_monitor", "wandb_examples"} <= set(ours)
    for key, node in ours.items():
        _check(node._target_, set(node) - {"_target_"}, f"callbacks.{key}")


def test_certifier_options_live_in_their_yaml(tmp_path):
    node = compose_cfg("eval", ["ckpt_path=x.ckpt", "evaluation=certify"], tmp_path
                       ).evaluation.certify
    _check(node._target_, set(node) - {"_target_"}, "conf/evaluation/certify.yaml")


def test_no_default_restated_by_a_preset_of_the_same_class():
    """Presets that extend another (defaults: - pgd) set only what differs."""
    for path in sorted((CONF / "attack").glob("*.yaml")):
        own = OmegaConf.load(path)
        bases = [b for b in own.get("defaults", []) if b != "_self_"]
        for base in bases:
            parent = attack_config(base)
            for key, value in own.items_ex(resolve=False):
                if key != "defaults" and key in parent and not OmegaConf.is_interpolation(
                        own, key):
                    assert parent[key] != value, f"{path.name} restates {key}={value!r}"


def _imports(package: str) -> set[tuple[str, str]]:
    """(file, imported top-level package) for every import in ``package``."""
    out = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add((str(path.relative_to(ROOT)), node.module.split(".")[0]))
            elif isinstance(node, ast.Import):
                out.update((str(path.relative_to(ROOT)), a.name.split(".")[0])
                           for a in node.names)
    return out


def test_imports_between_the_packages_go_one_way():
    """datamodules may use lightning_modules' core (errors, tasks) and corruptions;
    lightning_modules never imports datamodules (train.py / evaluate.py join them)."""
    back = sorted(f for f, mod in _imports("lightning_modules") if mod == "datamodules")
    assert not back, f"lightning_modules imports datamodules in {back}"
    used = {f for f, mod in _imports("datamodules") if mod == "lightning_modules"}
    assert used  # the direction that is allowed is in use


def test_core_imports_nothing_else_of_the_project():
    for path in (ROOT / "lightning_modules" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("datamodules",)) and (
                    not node.module.startswith("lightning_modules")
                    or node.module.startswith("lightning_modules.core")), \
                    f"{Path(path).name} imports {node.module}"
