"""An attack as ``conf/attack`` configures it, without Hydra: for library use, benchmarks and
tests. The constructors take every option as a required argument; the defaults live in
``conf/attack/<name>.yaml`` only (and the threat model, eps and norm, in ``conf/threat/``)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_modules.attacks.base import Attack
from lightning_modules.core.config import CONF_DIR, compose_file

__all__ = ["attack_config", "attack_from_config"]


def attack_config(name: str, threat: str = "linf", **overrides: Any):
    """``conf/attack/<name>.yaml`` composed, its ``${threat.*}`` resolved from
    ``conf/threat/<threat>.yaml``, then ``overrides`` (e.g. ``eps=4/255``, ``steps=20``)."""
    path = CONF_DIR / "attack" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"attack {name!r} is not one of {options}")
    root = OmegaConf.create({"threat": compose_file(CONF_DIR / "threat" / f"{threat}.yaml"),
                             "attack": compose_file(path)})
    node = OmegaConf.to_container(root, resolve=True)["attack"]
    unknown = sorted(set(overrides) - set(node))
    if unknown:
        raise ValueError(f"attack {name!r} has no option {unknown[0]!r} (it has "
                         f"{sorted(set(node) - {'_target_'})})")
    return OmegaConf.create({**node, **overrides})


def attack_from_config(name: str, threat: str = "linf", **overrides: Any) -> Attack:
    """The attack of ``conf/attack/<name>.yaml`` with ``overrides``:
    ``attack_from_config("pgd", eps=8/255, steps=20)``."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(attack_config(name, threat, **overrides), _convert_="all")
    except InstantiationException as err:  # re-raise what the attack itself raised
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None
