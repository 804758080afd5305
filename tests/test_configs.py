"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from lightning_modules.attacks import Attack, parse_eps
from lightning_modules.core.config import instantiate_node
from lightning_modules.core.errors import ConfigError
from lightning_modules.defenses import Defense
from lightning_modules.training.build import build, build_defense
from tests.conftest import CONF, compose_cfg

GROUPS = ["datamodule", "backbone", "defense", "attack", "module", "trainer", "logger",
          "callbacks", "experiment", "debug", "paths", "hydra"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_exists():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


def _dataset_fixture(option: str, root) -> list[str]:
    """Overrides that point the ``option`` datamodule at a tiny fixture in its layout."""
    from tests import layouts

    small = ["datamodule.val_fraction=0.2", "datamodule.test_fraction=0.2"]
    if option == "isic2018":
        return [f"datamodule.data_dir={layouts.write_isic2018(root / option)}", *small]
    if option == "isic2019":
        return [f"datamodule.data_dir={layouts.write_isic2019(root / option)}", *small]
    if option == "chestxray14":
        return [f"datamodule.data_dir={layouts.write_chestxray14(root / option)}", *small]
    if option == "medmnist":
        layouts.write_medmnist(root / option, "pathmnist")
        return [f"datamodule.data_dir={root / option}", "datamodule.flag=pathmnist"]
    if option == "folder":
        return [f"datamodule.data_dir={layouts.write_folder(root / option)}", *small]
    if option == "csv":
        return [f"datamodule.data_dir={layouts.write_csv_dataset(root / option)}",
                "datamodule.csv_file=labels.csv", "datamodule.label_column=diagnosis", *small]
    if option == "isic2016":
        return [f"datamodule.data_dir={layouts.write_isic2016(root / option)}"]
    if option == "messidor":
        return [f"datamodule.data_dir={layouts.write_messidor(root / option)}"]
    return []


def experiment_fixture(option: str, root) -> list[str]:
    """Overrides that point the ``option`` experiment preset at a fixture in its layout, at the
    smallest image size its backbone takes (HAM10000 presets: see ``ham_dir``)."""
    from tests import layouts

    if option.startswith("pneumonia"):
        return [f"datamodule.data_dir={layouts.write_pneumonia(root / option)}"]
    if option == "xu2021_isic2016":
        return [*_dataset_fixture("isic2016", root), "datamodule.image_size=32"]
    if option == "xu2021_messidor":
        return [*_dataset_fixture("messidor", root), "datamodule.image_size=75"]
    if option == "xu2021_chestxray14":
        return [*_dataset_fixture("chestxray14", root), "datamodule.image_size=32"]
    return []


def _extra(group: str, option: str, ham_dir) -> list[str]:
    extra = []
    if (group == "datamodule" and option == "ham10000") or (
            group == "experiment" and "ham10000" in option):
        extra.append(f"datamodule.data_dir={ham_dir}")
    elif group == "datamodule":
        extra += _dataset_fixture(option, ham_dir.parent)
    elif group == "experiment":
        extra += experiment_fixture(option, ham_dir.parent)
    if group == "experiment":
        extra.append("datamodule.num_workers=0")
    if group == "defense" and option == "smoothadv":
        extra.append("threat=l2")  # it attacks the smoothed classifier in L2 only
    if group == "backbone" and option == "inception_v3":
        extra.append("datamodule.image_size=75")  # its smallest input
    if group == "trainer" and option in ("gpu", "ddp", "ddp_multinode") and \
            not torch.cuda.is_available():
        # the GPU presets compose as written; only their device is swapped to build here
        extra += ["trainer.accelerator=cpu", "trainer.devices=1"]
    return extra


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in GROUPS for o in options(g) if g != "hydra"])
def test_option_composes_and_builds(group, option, tmp_path, ham_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [f"{group}={option}", *_extra(group, option, ham_dir)]
    if group != "trainer" and group != "experiment":
        overrides.append("trainer=cpu")
    cfg = compose_cfg("train", overrides, tmp_path)
    parts = build(cfg)
    # the trainer as the composed config says (the GPU presets' device swapped to CPU above)
    from lightning.pytorch import Trainer

    from lightning_modules.training.resume import AtomicCheckpointIO

    trainer, tcfg = parts["trainer"], cfg.trainer
    assert type(trainer) is Trainer
    assert (trainer.max_epochs, trainer.min_epochs, trainer.num_devices, trainer.num_nodes) == \
        (tcfg.max_epochs, tcfg.min_epochs, tcfg.devices, tcfg.get("num_nodes", 1))
    assert trainer.precision == {"32": "32-true", "16": "16-mixed"}.get(str(tcfg.precision),
                                                                        str(tcfg.precision))
    accelerator = tcfg.accelerator if tcfg.accelerator != "auto" else \
        ("gpu" if torch.cuda.is_available() else "cpu")
    assert type(trainer.accelerator).__name__ == {"cpu": "CPUAccelerator",
                                                  "gpu": "CUDAAccelerator"}[accelerator]
    assert type(trainer.strategy).__name__ == ("DDPStrategy" if tcfg.get("strategy") == "ddp"
                                               else "SingleDeviceStrategy")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert trainer.loggers == list(parts["loggers"])
    assert trainer.validate_loop.inference_mode is trainer.test_loop.inference_mode is False
    module = parts["module"]
    assert isinstance(module.defense, Defense) and isinstance(module.val_attack, Attack)
    dm = parts["datamodule"]
    size = max(32, int(cfg.datamodule.get("image_size") or 32))
    x = torch.rand(2, dm.in_chans, size, size)
    assert module.net(x).shape == (2, dm.num_classes)
    if "wandb" in option or option == "many_loggers":
        import wandb

        wandb.finish()


@pytest.mark.parametrize("preset,attacks,cascade", [
    ("quick", {"pgd"}, False), ("standard", {"pgd", "fast"}, True),
    ("autoattack", {"pgd", "aa"}, False),
    ("full", {"fgsm", "pgd", "pgd_cw", "pgd_t", "fast", "aa", "pgd_hide", "pgd_add", "gap"},
     False),
    ("xu2021", {"pgd", "gap"}, False), ("corruptions", {"pgd"}, False),
    ("certify", {"pgd"}, False)])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eval_config_composes(tmp_path, preset, attacks, cascade, norm):
    from omegaconf import OmegaConf

    from lightning_modules.evaluation.checkpoint import inherit_threat

    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", f"evaluation={preset}",
                               f"threat.norm={norm}"], tmp_path)
    # what evaluate.py does first: the eps (and a null norm) from the checkpoint's training threat
    inherit_threat(cfg, OmegaConf.create({"threat": {"norm": "linf", "eps": "8/255"}}))
    assert set(cfg.attacks) == attacks and cfg.evaluation.cascade is cascade
    assert cfg.evaluation.name == preset and cfg.evaluation.strict is False
    for name in cfg.attacks:
        atk = instantiate(cfg.attacks[name])
        # certify: the certificate is L2, so are its attacks, whatever the threat
        assert isinstance(atk, Attack) and atk.norm == ("l2" if preset == "certify" else norm)
    assert len(cfg.eps_grid) >= 3 and cfg.eps_grid[0] == 0
    certify = cfg.evaluation.certify
    assert (certify is not None) == (preset == "certify")
    if certify is not None:  # the radii are the grid of the attack rows too
        assert list(cfg.eps_grid) == list(certify.radii) == [0, 0.25, 0.5, 1.0]
        assert certify.sigma is None and instantiate(certify.attack).norm == "l2"
    assert compose_cfg("eval", ["ckpt_path=x.ckpt"], tmp_path).evaluation.name == "standard"
    corruptions = cfg.evaluation.corruptions  # one node, conf/corruptions, where mounted
    assert (corruptions is not None) == (preset in ("full", "xu2021", "corruptions"))
    if corruptions is not None:
        assert corruptions.set == "auto" and list(corruptions.severities) == [1, 2, 3, 4, 5]


DEFENSES = options("defense")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps", ["2/255", "0.5"])
def test_threat_reaches_every_attack(norm, eps, tmp_path):
    """``threat.norm`` and ``threat.eps`` set every attack of every defense, the validation
    attack and every evaluation attack; the only exception is refused with a clear error."""
    value = parse_eps(eps)
    for defense in DEFENSES:
        cfg = compose_cfg("train", [f"defense={defense}", f"threat.norm={norm}",
                                    f"threat.eps={eps}"], tmp_path)
        val = instantiate_node(cfg, "attack")
        assert (val.norm, val.eps) == (norm, pytest.approx(value))
        if (defense, norm) in (("n_fgsm", "l2"), ("fgsm_pgi", "l2"), ("smoothadv", "linf")):
            # N-FGSM and FGSM-PGI are defined for L-inf only, SmoothAdv (the smoothed
            # classifier) for L2
            with pytest.raises(ConfigError, match="norm"):
                build_defense(cfg)
            continue
        built = build_defense(cfg)[0]
        if defense == "fgsm_pgi":  # crafts its own FGSM step from per-image priors
            assert built.eps == pytest.approx(value)
            continue
        attacks = list(built.attacks.values())
        assert attacks or defense in ("none", "gaussian"), defense
        for atk in attacks:
            assert atk.norm == norm, (defense, atk)
        radii = [a.eps for a in attacks]
        if defense == "mpadvt":  # levels at 1/8, 1/4, 1/2 and 1 x threat.eps
            assert radii == pytest.approx([value / 8, value / 4, value / 2, value])
        else:
            assert radii == pytest.approx([value] * len(attacks)), defense
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", f"threat.norm={norm}", f"threat.eps={eps}"],
                      tmp_path)
    assert set(cfg.attacks) == {"pgd", "fast"}  # evaluation=standard
    for name in cfg.attacks:
        atk = instantiate_node(cfg.attacks, name)
        assert (atk.norm, atk.eps) == (norm, pytest.approx(value)), name


def test_per_attack_override_wins(tmp_path):
    cfg = compose_cfg("train", ["defense=fgsm_pgd_at", "threat.eps=8/255",
                                "defense.attacks.pgd.eps=2/255", "defense.attacks.pgd.norm=l2",
                                "attack.eps=4/255"], tmp_path)
    attacks = build_defense(cfg)[0].attacks
    assert (attacks["pgd"].norm, attacks["pgd"].eps) == ("l2", pytest.approx(2 / 255))
    assert (attacks["fgsm"].norm, attacks["fgsm"].eps) == ("linf", pytest.approx(8 / 255))
    assert instantiate_node(cfg, "attack").eps == pytest.approx(4 / 255)
    # another preset for one mounted attack, and one more attack in evaluation
    cfg = compose_cfg("train", ["defense=pgd_at", "attack@defense.attacks.pgd=pgd20"], tmp_path)
    assert build_defense(cfg)[0].attacks["pgd"].restarts == 2
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", "+attack@attacks.pgd_l2=pgd_l2",
                               "attacks.pgd.norm=l2", "threat.norm=linf", "threat.eps=8/255"],
                      tmp_path)
    assert {n: instantiate_node(cfg.attacks, n).norm for n in cfg.attacks} == {
        "fast": "linf", "pgd": "l2", "pgd_l2": "l2"}


def test_each_attack_is_written_once():
    """Defenses and evaluation mount conf/attack nodes; no attack is spelled out elsewhere."""
    for path in [*(CONF / "defense").glob("*.yaml"), CONF / "eval.yaml", CONF / "train.yaml"]:
        text = path.read_text()
        assert "lightning_modules.attacks" not in text, path


@pytest.mark.parametrize("option", options("datamodule"))
def test_datamodule_defaults_live_in_one_place(option):
    """Each datamodule option is in its YAML (so ``datamodule.<key>=...`` works without ``+``),
    the code gives it no default of its own, and a dataset file restates no base value."""
    import inspect

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from datamodules import datamodule_config
    from datamodules.table import TABLE_OPTIONS, ImageTableDataModule

    cfg = datamodule_config(option)
    hydra_cfg = compose_cfg("train", [f"datamodule={option}"], CONF.parent / "unused").datamodule
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(hydra_cfg)  # as Hydra composes
    cls = get_class(cfg._target_)
    keys = set(cfg) - {"_target_"}
    if issubclass(cls, ImageTableDataModule):
        accepted = set(TABLE_OPTIONS) | set(cls.dataset_options)
    else:
        params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
                  if n != "self"}
        defaults = sorted(n for n, p in params.items() if p.default is not inspect.Parameter.empty)
        assert not defaults, f"{cls.__name__} has defaults in code for {defaults}"
        accepted = set(params)
    assert keys == accepted, (sorted(keys - accepted), sorted(accepted - keys))
    own = OmegaConf.to_container(OmegaConf.load(CONF / "datamodule" / f"{option}.yaml"))
    extends = [d.split("@")[0] for d in own.get("defaults", []) if isinstance(d, str)]
    chain = ["base/loader", "base/files"] if "base/files" in extends else extends
    bases = [OmegaConf.load(CONF / "datamodule" / f"{b}.yaml") for b in chain if b != "_self_"]
    for key, value in own.items():
        for base in bases:
            if key in base:
                assert base[key] != value, f"{option}.yaml restates {key}={value!r} from its base"


EXPERIMENTS = options("experiment")


@pytest.mark.parametrize("preset", EXPERIMENTS)
def test_every_experiment_preset_trains_a_few_batches(preset, tmp_path, ham_dir):
    """Each study preset, as written (its datamodule, backbone, defense), on a fixture in its
    dataset's layout: one epoch of 2 batches, adversarial validation and test on one batch
    (one-step attacks: DenseNet-121 and Inception-v3 take seconds per step on a CPU)."""
    from train import train

    overrides = [f"experiment={preset}", *_extra("experiment", preset, ham_dir),
                 "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                 "trainer.accelerator=cpu", "datamodule.batch_size=4",
                 "datamodule.eval_batch_size=4", "print_summary=false", "logger=csv",
                 "attack.steps=1", "threat.train_steps=1"]  # the big backbones cost seconds a step
    if "image_size" not in " ".join(overrides):
        overrides.append("datamodule.image_size=32")
    if preset == "synthetic_multilabel":
        overrides += ["datamodule.n_train=16", "datamodule.n_val=8", "datamodule.n_test=8"]
    result = train(compose_cfg("train", overrides, tmp_path / "run"))
    for key in ("test/acc", "test/adv_acc"):
        assert 0 <= result["test"][key] <= 1, result["test"]


@pytest.mark.parametrize("preset", [p for p in EXPERIMENTS if p.startswith(("xu2021", "pneumonia"))])
@pytest.mark.parametrize("arm", ["none", "mpadvt_released", "maadvt", "pgd_at"])
def test_study_presets_build_with_every_arm_of_their_sweep(preset, arm, tmp_path, ham_dir):
    cfg = compose_cfg("train", [f"experiment={preset}", f"defense={arm}",
                                *_extra("experiment", preset, ham_dir)], tmp_path)
    defense, _ = build_defense(cfg)
    assert isinstance(defense, Defense) and defense.name == arm
    if arm == "mpadvt_released":
        assert defense.mode == "released" and defense.attack.step_size == pytest.approx(1 / 255)
