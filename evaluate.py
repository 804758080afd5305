"""Attack a trained checkpoint over a grid of epsilons and write a robustness report.

    python evaluate.py ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt
    python evaluate.py ckpt_path=... evaluation=quick      # PGD-20 only (standard | full)
    python evaluate.py ckpt_path=... 'eps_grid=[0,2/255,4/255]' attacks.pgd.restarts=3
    python evaluate.py ckpt_path=... trainer=ddp trainer.devices=4 trainer.precision=bf16-mixed

The checkpoint carries the resolved training config (data, backbone, task), so nothing else is
needed; ``+datamodule.*`` keys here override the stored ones (e.g. another ``data_dir``). The
attacks are the ``conf/attack`` nodes mounted under ``attacks`` by the ``evaluation`` preset
(``conf/evaluation``; ``threat.norm`` sets their norm); each runs at every eps of ``eps_grid``,
and with two or more attacks each radius also gets the per-sample worst case over them
(``worst``). With ``evaluation.cascade`` each attack runs only on the images the earlier ones
did not fool (AutoAttack's way; rows become cumulative); the report gives each attack's cost. Evaluation runs through a Lightning ``Trainer``
built from the ``trainer`` group, as training does (devices, precision, DDP, limits such as
``trainer.limit_test_batches``), with :class:`~lightning_modules.evaluation.EvaluationModule`.
Report (default ``<run dir>/eval/<checkpoint name>/``): ``report.json`` (RobustBench-like: clean metrics, then
per attack and epsilon), ``report.csv`` (one row per attack and epsilon), ``accuracy_vs_eps.png``
and ``report.md`` (the tables in order, with a short reading). The row at eps=0 must equal the clean metrics (the attacks are the identity).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Subset, TensorDataset

from datamodules import complete_stored_config
from datamodules.corruptions import CORRUPTION_SETS, set_for_datamodule, to_uint8
from datamodules.dataset import skip_none_collate
from datamodules.splits import stratified_subset
from lightning_modules.analysis import ANALYSES, run_analyses
from lightning_modules.analysis.corruption import (
    corruption_errors,
    corruption_markdown,
    corruption_scores,
    flip_probability,
    mce,
    plot_corruptions,
    summarise,
)
from lightning_modules.attacks import GAP, PGD, AutoAttack, parse_eps
from lightning_modules.evaluation import EvaluationModule
from lightning_modules.gap import fit_generator, load_generator, save_generator
from lightning_modules.honesty import failed, model_checks, probe_checks, report_checks
from lightning_modules.report import EvalReport, ResultRow, software_versions
from lightning_modules.selection import chance_level
from lightning_modules.tasks import SCORE_METRIC, Task
from lightning_modules.utils import (
    ConfigError,
    exit_on_config_error,
    format_eps,
    instantiate_node,
    register_resolvers,
    write_json,
)

log = logging.getLogger("medrobust.evaluate")
register_resolvers()


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a medrobust checkpoint (weights only, no pickled code) and check it."""
    if not path or path == "???":
        raise ConfigError("ckpt_path is not set: python evaluate.py ckpt_path=PATH")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"ckpt_path={str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot load checkpoint {p}: {err}") from err
    if "medrobust_config" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{p} is not a medrobust checkpoint (no stored training config)")
    return ckpt


# A checkpoint may come from a stranger: its stored config may only build our own classes (and
# an albumentations pipeline), never an arbitrary callable such as a file writer.
TRUSTED_TARGETS = ("datamodules.", "lightning_modules.", "albumentations.")


def check_targets(node: Any, where: str) -> None:
    """Raise :class:`ConfigError` for any ``_target_`` under ``node`` outside
    :data:`TRUSTED_TARGETS`."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(TRUSTED_TARGETS):
            raise ConfigError(f"{where}._target_={target!r} in the checkpoint's stored config is "
                              f"not one of this project's classes {list(TRUSTED_TARGETS)}; "
                              "refusing to build it")
        for key, value in node.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def build_from_checkpoint(ckpt: dict, datamodule_overrides: DictConfig | None):
    """Rebuild the datamodule and the network (weights loaded) from a checkpoint; only
    trusted ``_target_`` classes are built from its stored config."""
    for key in ("datamodule", "backbone"):
        check_targets(ckpt["medrobust_config"].get(key), key)
    train_cfg = OmegaConf.create(ckpt["medrobust_config"])
    train_cfg.datamodule = complete_stored_config(train_cfg.datamodule)  # older checkpoints
    for key in ("num_classes", "task", "in_chans", "image_size"):  # fixed by the weights
        if datamodule_overrides and key in datamodule_overrides and \
                datamodule_overrides[key] != train_cfg.datamodule.get(key):
            raise ConfigError(f"+datamodule.{key}={datamodule_overrides[key]!r}: the checkpoint "
                              f"was trained with {key}={train_cfg.datamodule.get(key)!r}, which "
                              "its weights fix; evaluate it on data of that shape")
    if datamodule_overrides:
        train_cfg.datamodule = OmegaConf.merge(train_cfg.datamodule, datamodule_overrides)
    datamodule = instantiate_node(train_cfg, "datamodule")
    net = instantiate_node(train_cfg, "backbone")
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"the checkpoint's weights do not fit the network its config builds: "
                          f"{str(err).splitlines()[0][:200]}") from err
    return train_cfg, datamodule, net


def take_subset(datamodule, split: str, n: Any, seed: int) -> int | None:
    """With ``subset=N``, evaluate a seeded class-stratified random ``N`` images of ``split``
    (not the first ``N``: files are often sorted by class). Returns the split's size, or
    ``None`` when the whole split is evaluated."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"subset={n!r} must be a positive number of images or null")
    datamodule.prepare_data()
    datamodule.setup("test" if split == "test" else "validate")
    ds = datamodule.datasets[split]
    labels = getattr(ds, "targets", None)  # what the dataset holds (after skipped images)
    if labels is None:
        labels = ds.tensors[1] if isinstance(ds, TensorDataset) else datamodule.targets(split)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    keep = stratified_subset(labels, n, seed)
    datamodule.datasets[split] = Subset(ds, keep.tolist())
    return len(labels)


def prepare_gap(cfg: DictConfig, attacks: dict, net, task: str, train_cfg: DictConfig,
                datamodule, out_dir: Path, ckpt: dict) -> dict[str, dict]:
    """Give every GAP attack its generator: loaded from ``path`` (or the default file beside
    the report) when one of the same settings was saved, else fitted on the training split
    (a Lightning fit, same ``trainer`` config) and saved there. Returns what happened."""
    info = {}
    for name, atk in list(attacks.items()):
        if not isinstance(atk, GAP) or atk.generator is not None:
            continue
        datamodule.prepare_data()
        datamodule.setup("fit")
        chans = getattr(datamodule, "in_chans", None) or train_cfg.datamodule.get("in_chans")
        size = train_cfg.datamodule.get("image_size")
        if not (chans and size):
            x, _ = next(iter(datamodule.train_dataloader()))
            chans, size = x.shape[1], x.shape[-1]
        digest = hashlib.sha1(json.dumps(atk.signature(), sort_keys=True).encode()).hexdigest()
        path = Path(atk.path).expanduser() if atk.path else out_dir / f"gap-{name}-{digest[:8]}.pt"
        # a generator is reused only against the checkpoint it was fitted on
        against = {"checkpoint": str(Path(cfg.ckpt_path).resolve()),
                   "global_step": ckpt.get("global_step")}
        loaded = load_generator(path, atk, int(chans), int(size), against)
        if loaded is None and atk.path:
            raise ConfigError(f"attacks.{name}.path={atk.path!r}: no saved GAP generator with "
                              f"these settings {atk.signature()} there")
        if loaded is not None:
            generator, meta = loaded
            info[name] = {"path": str(path), "reused": True, **meta}
        else:
            log.info("fitting the GAP generator %s on the training split (%d epochs)", name,
                     atk.epochs)
            fit_trainer = instantiate_node(
                cfg, "trainer", logger=False, callbacks=[], enable_checkpointing=False,
                max_epochs=atk.epochs, limit_train_batches=atk.max_batches or 1.0,
                limit_val_batches=0, num_sanity_val_steps=0)
            generator, meta = fit_generator(atk, net, task, datamodule, fit_trainer,
                                            int(chans), int(size))
            if fit_trainer.is_global_zero:
                save_generator(path, generator, atk, meta, against)
            info[name] = {"path": str(path), "reused": False, **meta}
        attacks[name] = atk.with_generator(generator.to(next(net.parameters()).device))
    return info


def analyses(cfg: DictConfig, options: Any, net, datamodule, split: str, task: str,
             num_classes: int, attacks: dict, eps_grid: list[float], class_names, out_dir: Path
             ) -> dict[str, Any]:
    """The second study's analyses (lightning_modules/analysis) on a seeded random sample of
    ``evaluation.analysis_images`` images of the split, with the untargeted PGD and GAP
    attacks at the largest radius; figures in ``<output dir>/analyses/``."""
    eps = max(eps_grid)
    chosen = {n: a.with_eps(eps) for n, a in attacks.items()
              if (type(a) is PGD and a.targeted is None) or isinstance(a, GAP)}
    if not chosen or eps == 0:
        log.warning("evaluation.analyses: no untargeted PGD or GAP attack, or eps_grid is all 0")
        return {"skipped": "no untargeted PGD or GAP attack at an eps > 0"}
    ds = datamodule.datasets[split]
    n = min(int(options.get("analysis_images") or 256), len(ds))
    gen = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
    pick = torch.randperm(len(ds), generator=gen)[:n].tolist()
    loader = DataLoader(Subset(ds, pick), batch_size=n, collate_fn=skip_none_collate)
    x, y = next(iter(loader))
    device = next(net.parameters()).device
    start = time.perf_counter()
    which = options.analyses
    which = ANALYSES if which is True else [which] if isinstance(which, str) else list(which)
    try:
        result = run_analyses(net, x.to(device), y.to(device), Task(task), num_classes, chosen,
                              out_dir / "analyses", class_names,
                              seed=int(cfg.get("seed") or 0), which=which)
    except ValueError as err:
        if "unknown analyses" in str(err):
            raise ConfigError(f"evaluation.analyses: {err}") from err
        raise
    result.update(eps=format_eps(eps), attacks=list(chosen),
                  seconds=round(time.perf_counter() - start, 1))
    return result


def corruption_benchmark(cfg: DictConfig, spec: Any, net, train_cfg: DictConfig, datamodule,
                         split: str, task: str, num_classes: int, out_dir: Path
                         ) -> dict[str, Any]:
    """The common-perturbation benchmark (``evaluation.corruptions``) on the split (after
    ``subset``), or a seeded random ``images`` of it: scores per corruption and severity,
    their summary, the flip probability of perturbation sequences, and CE / mCE against
    ``baseline`` (a checkpoint, measured here on the same images, or a report.json or report
    folder of one measured on the same images). Figures in ``<output dir>/corruptions/``."""
    start = time.perf_counter()
    set_name = str(spec.get("set") or "auto")
    if set_name == "auto":
        set_name = set_for_datamodule(train_cfg.datamodule)
    if set_name not in CORRUPTION_SETS:
        raise ConfigError(f"evaluation.corruptions.set={set_name!r} must be auto or one of "
                          f"{sorted(CORRUPTION_SETS)}")
    severities = [int(s) for s in spec.get("severities") or (1, 2, 3, 4, 5)]
    if not severities or any(not 1 <= s <= 5 for s in severities):
        raise ConfigError(f"evaluation.corruptions.severities={severities} must be in 1..5")
    seed = int(cfg.get("seed") or 0)
    ds = datamodule.datasets[split]
    if spec.get("images"):
        gen = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=gen)[:int(spec.images)].tolist())
    loader = DataLoader(ds, batch_size=int(spec.get("batch_size") or 64),
                        collate_fn=skip_none_collate)
    kinds = list(spec.get("sequences") or [])
    frames = int(spec.get("frames") or 10)

    def measure(model) -> tuple[dict, dict | None]:
        scores = corruption_scores(model, loader, task, num_classes, set_name, severities, seed)
        flips = flip_probability(model, loader, task, kinds, frames, seed) if kinds else None
        return scores, flips

    if len(ds) == 0:
        raise ConfigError(f"evaluation.corruptions: the {split} split is empty")
    result, flips = measure(net)
    result.update(summarise(result))
    result["flip_probability"] = flips
    baseline = spec.get("baseline")
    if baseline:
        base, base_flips = corruption_baseline(str(baseline), result, measure, task,
                                               num_classes, next(net.parameters()).device)
        errors, clean_err = corruption_errors(result)
        base_errors, base_clean_err = corruption_errors(base)
        result["baseline"] = {"source": str(baseline), "clean": base["clean"],
                              **mce(errors, clean_err, base_errors, base_clean_err)}
        if flips and base_flips:
            rel = {k: v / base_flips["kinds"][k] if base_flips["kinds"].get(k) else None
                   for k, v in flips["kinds"].items()}
            vals = [v for v in rel.values() if v is not None]
            result["baseline"].update(relative_fp=rel,
                                      mfp=float(np.mean(vals)) if vals else None)
    sample = next(iter(DataLoader(ds, batch_size=1, collate_fn=skip_none_collate)))[0]
    result["files"] = plot_corruptions(result, to_uint8(sample)[0], out_dir / "corruptions",
                                       seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def corruption_baseline(source: str, result: dict, measure, task: str, num_classes: int,
                        device: torch.device) -> tuple[dict, dict | None]:
    """The baseline's corruption scores: measured now for a checkpoint, read for a report."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise ConfigError(f"evaluation.corruptions.baseline={source!r}: no such file")
    if path.suffix == ".json":
        try:
            base = json.loads(path.read_text()).get("corruptions")
        except (OSError, ValueError) as err:
            raise ConfigError(f"evaluation.corruptions.baseline: {path}: {err}") from err
        if not base:
            raise ConfigError(f"evaluation.corruptions.baseline: {path} has no corruption "
                              "results (evaluate it with evaluation.corruptions set)")
        for key in ("set", "severities", "seed", "n_images"):
            if base.get(key) != result.get(key):
                raise ConfigError(f"evaluation.corruptions.baseline: {path} was measured with "
                                  f"{key}={base.get(key)!r}, this run with {result.get(key)!r}: "
                                  "not the same images and corruptions")
        return base, base.get("flip_probability")
    ckpt = load_checkpoint(str(path))
    base_cfg, _, base_net = build_from_checkpoint(ckpt, None)
    if (base_cfg.datamodule.task, int(base_cfg.datamodule.num_classes)) != (task, num_classes):
        raise ConfigError(f"evaluation.corruptions.baseline: {path} is a "
                          f"{base_cfg.datamodule.task} model of {base_cfg.datamodule.num_classes}"
                          f" classes, this one {task} of {num_classes}")
    log.info("corruption baseline: measuring %s on the same images", path)
    return measure(base_net.to(device))


def resume_signature(cfg: DictConfig, ckpt: dict, attacks: dict, eps_grid: list[float],
                     cascade: bool, split: str, n_split: int | None) -> dict[str, Any]:
    """What saved batches must match to be reused after a kill (plain values only)."""
    return json.loads(json.dumps({
        "checkpoint": str(Path(cfg.ckpt_path).resolve()), "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"), "split": split, "subset": cfg.get("subset"),
        "n_split": n_split, "seed": cfg.get("seed"), "eps_grid": eps_grid, "cascade": cascade,
        "attacks": {n: a.describe() for n, a in attacks.items()},
        "datamodule": OmegaConf.to_container(cfg.datamodule, resolve=True)
        if cfg.get("datamodule") else None,
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True)}, default=str))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the grid through a Trainer and write the report (rank 0); returns the report."""
    start = time.perf_counter()
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt = load_checkpoint(cfg.ckpt_path)
    train_cfg, datamodule, net = build_from_checkpoint(ckpt, cfg.get("datamodule"))
    task, num_classes = train_cfg.datamodule.task, int(train_cfg.datamodule.num_classes)
    eps_grid = [parse_eps(e, "eps_grid") for e in cfg.eps_grid]
    if not eps_grid:
        raise ConfigError("eps_grid is empty")
    if not cfg.get("attacks"):
        raise ConfigError("attacks is empty: mount at least one conf/attack node")
    attacks = {name: instantiate_node(cfg.attacks, name) for name in cfg.attacks}
    skipped = {name: f"{atk.name} attacks only {'/'.join(atk.tasks)} tasks, this one is {task}"
               for name, atk in attacks.items() if task not in atk.tasks}
    for name, why in skipped.items():  # e.g. AutoAttack on a multi-label checkpoint
        log.warning("attack %s skipped: %s", name, why)
        del attacks[name]
    if not attacks:
        raise ConfigError(f"no mounted attack can attack a {task} task: {skipped}")
    options = cfg.get("evaluation") or {}
    cascade = bool(options.get("cascade")) and task == "multiclass"
    split = cfg.get("split", "test")
    if split not in ("val", "test"):
        raise ConfigError(f"split={split!r} must be 'val' or 'test'")
    ckpt_file = Path(cfg.ckpt_path).resolve()  # one folder per checkpoint: no overwriting
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else \
        ckpt_file.parent.parent / "eval" / ckpt_file.stem
    gap_info = prepare_gap(cfg, attacks, net, task, train_cfg, datamodule, out_dir, ckpt)
    n_split = take_subset(datamodule, split, cfg.get("subset"), int(cfg.get("seed") or 0))
    class_names = list(getattr(datamodule, "class_names", None) or []) or None
    try:
        module = EvaluationModule(net, task, num_classes, attacks, eps_grid,
                                  channels_last=bool(train_cfg.get("module", {})
                                                     .get("channels_last")),  # as trained
                                  class_names=class_names, cascade=cascade,
                                  resume_dir=out_dir / "partial" if cfg.get("resume", True)
                                  else None,
                                  signature=resume_signature(cfg, ckpt, attacks, eps_grid,
                                                             cascade, split, n_split))
    except ValueError as err:
        raise ConfigError(f"attacks: {err}") from err
    # every image once across DDP ranks: no DistributedSampler padding with duplicates
    datamodule.shard_eval = True
    trainer = instantiate_node(cfg, "trainer", logger=False, callbacks=[],
                               enable_checkpointing=False, use_distributed_sampler=False)
    if getattr(trainer, "_inference_mode", False):
        raise ConfigError("trainer.inference_mode must be false: attacks need gradients")
    if split == "test":
        trainer.test(module, datamodule=datamodule, verbose=False)
    else:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if module.n_images == 0:
        raise ConfigError(f"the {split} split is empty")

    rows = []
    for kind, metrics in module.results.items():
        if kind == "clean":
            continue
        name, eps_str = kind.rsplit("@", 1)
        cell = module.cells.get(kind)  # None for a worst-case row
        if cell is None:
            norm = module.cells[module.evaluator.worst_case[kind][0]].norm
            desc = {"norm": norm, "eps": parse_eps(eps_str), "steps": None, "restarts": None}
        else:
            desc = cell.describe()
        rows.append(ResultRow(attack=name, norm=desc["norm"], eps=desc["eps"], eps_str=eps_str,
                              steps=desc.get("steps"), restarts=desc.get("restarts"),
                              seconds=module.cost.get(kind, {}).get("seconds"),
                              images_attacked=module.cost.get(kind, {}).get("images_attacked"),
                              metrics=metrics))
    rep = EvalReport(
        checkpoint=str(Path(cfg.ckpt_path).resolve()),
        epoch=ckpt.get("epoch"),
        dataset=train_cfg.datamodule.get("_target_"),
        backbone=train_cfg.backbone.get("name", train_cfg.backbone.get("_target_")),
        defense=train_cfg.defense.get("name", train_cfg.defense.get("_target_")),
        train_threat=OmegaConf.to_container(train_cfg.get("threat", {}), resolve=True),
        task=task, num_classes=num_classes, class_names=class_names,
        score_metric=SCORE_METRIC[task],
        chance={SCORE_METRIC[task]: chance_level(task, num_classes)},
        split=split, n_images=module.n_images,
        subset=None if n_split is None else
        f"{module.n_images} of {n_split} (seeded, class-stratified)",
        threat_model={"norm": sorted({a.norm for a in attacks.values()}),
                      "eps_grid": [format_eps(e) for e in eps_grid]},
        evaluation=options.get("name"),
        precision=str(trainer.precision), devices=trainer.world_size,
        clean=module.results["clean"],
        attacks={name: attacks[name].describe() for name in attacks},
        skipped_attacks=skipped, cascade=cascade,
        cost=cost_table(module.cost, module.n_images),
        gap=gap_info or None,
        worst_case=dict(module.evaluator.worst_case) or None,
        results=rows, software=software_versions(), resumed_batches=module.resumed)
    report = rep.as_dict()
    metrics = ("acc", SCORE_METRIC[task]) if SCORE_METRIC[task] != "acc" else ("acc",)
    kinds = {name: atk.name for name, atk in attacks.items()}
    checks = report_checks(report["clean"], report["results"], module.n_images, metrics, kinds,
                           bounded=("acc", "bal_acc") if task == "multiclass" else ())
    if module.probe is not None:  # None on a DDP rank whose shard held no batch
        checks += model_checks(net, *module.probe, Task(task))
        reference = next((a for a in attacks.values() if type(a) is PGD and a.targeted is None),
                         None)
        if options.get("probes") and reference is not None and max(eps_grid) > 0:
            queries = min([1000] + [a.square_queries for a in attacks.values()
                                    if isinstance(a, AutoAttack)])
            checks += probe_checks(net, *module.probe, Task(task), num_classes,
                                   reference.with_eps(max(eps_grid)), square_queries=queries)
    if options.get("analyses") and trainer.is_global_zero:
        report["analyses"] = analyses(cfg, options, net, datamodule, split, task, num_classes,
                                      attacks, eps_grid, class_names, out_dir)
    if options.get("corruptions") and trainer.is_global_zero:
        report["corruptions"] = corruption_benchmark(cfg, options.corruptions, net, train_cfg,
                                                     datamodule, split, task, num_classes,
                                                     out_dir)
    report["checks"] = [c.as_dict() for c in checks]
    for c in failed(checks):
        log.warning("honesty check failed: %s: %s", c.check, c.detail)
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    report["output_dir"] = str(out_dir)
    if trainer.is_global_zero:
        write_report(report, out_dir)
        log_report(cfg, report, out_dir)
        shutil.rmtree(out_dir / "partial", ignore_errors=True)  # the report holds it all now
    bad = failed(checks)
    if bad and (cfg.get("evaluation") or {}).get("strict"):
        raise ConfigError(f"evaluation.strict=true and {len(bad)} honesty check(s) failed: "
                          + "; ".join(f"{c.check} ({c.detail})" for c in bad)
                          + f"; report kept in {out_dir}")
    return report


def cost_table(cost: dict[str, dict], n_images: int) -> dict[str, Any]:
    """Per cell its cost and the share of images it was spared (cascade; ``None`` at eps 0,
    where attacks are the identity), and the totals over the cells at eps > 0."""
    real = {name: c for name, c in cost.items() if not name.endswith("@0")}
    cells = {name: {**c, "images_spared": round(1 - c["images_attacked"] / n_images, 4)
                    if n_images and name in real else None} for name, c in cost.items()}
    attacked = sum(c["images_attacked"] for c in real.values())
    return {"per_attack": cells,
            "total_seconds": round(sum(c["seconds"] for c in cost.values()), 2),
            "images_attacked": attacked,
            "images_spared": round(1 - attacked / (n_images * len(real)), 4)
            if n_images and real else None}


def log_report(cfg: DictConfig, report: dict[str, Any], out_dir: Path) -> None:
    """Send the report to the configured loggers (``logger=wandb|csv|tensorboard``): scalars
    ``eval/<attack>@<eps>/<metric>`` to each; with wandb also the results table, the plot, the
    checks and ``report.json`` as an artifact, on the training run when its wandb folder lies
    beside the checkpoint (resumed by id), else on a new run grouped by the training run."""
    node = cfg.get("logger")
    if not node:
        return
    run_dir = Path(report["checkpoint"]).parent.parent
    scalars = {f"eval/clean/{k}": v for k, v in report["clean"].items()}
    scalars.update({f"eval/{r['attack']}@{r['eps_str']}/{k}": v for r in report["results"]
                    for k, v in r.items() if isinstance(v, float) and k not in ("eps", "seconds")})
    for key in node:
        target = str(node[key].get("_target_", ""))
        extra: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            found = sorted(run_dir.glob("wandb/*run-*-*"))
            extra = {"name": f"eval-{report['defense']}-{Path(report['checkpoint']).stem}",
                     "save_dir": str(out_dir)}
            if found:  # attach to the training run
                extra.update(id=found[-1].name.rsplit("-", 1)[-1], resume="allow")
            else:
                extra.update(group=run_dir.name, job_type="eval")
        lg = instantiate_node(node, key, **extra)
        lg.log_metrics(scalars, step=0)
        if target.endswith("WandbLogger"):
            _wandb_panels(lg.experiment, report, out_dir)
        lg.finalize("success")
        if target.endswith("WandbLogger"):
            import wandb

            wandb.finish()  # always finished: multiruns never hang on an open run


def _wandb_panels(run, report: dict[str, Any], out_dir: Path) -> None:
    import wandb

    cols = ["attack", "norm", "eps_str", "steps", "restarts", "images_attacked", "seconds",
            *report["clean"]]
    clean = {"attack": "clean", "eps_str": "0", **report["clean"]}
    run.log({
        "eval/results": wandb.Table(columns=cols, data=[[r.get(c) for c in cols]
                                                        for r in [clean, *report["results"]]]),
        "eval/checks": wandb.Table(columns=["check", "passed", "detail"],
                                   data=[[c["check"], c["passed"], c["detail"]]
                                         for c in report["checks"]]),
        "eval/metric_vs_eps": wandb.Image(str(out_dir / "accuracy_vs_eps.png")),
    })
    run.summary.update({"eval/n_images": report["n_images"],
                        "eval/failed_checks": sum(not c["passed"] for c in report["checks"])})
    panels: dict[str, Any] = {}
    for block, folder in (("analyses", "analyses"), ("corruptions", "corruptions")):
        for key, name in ((report.get(block) or {}).get("files") or {}).items():
            panels[f"eval/{block}/{key}"] = wandb.Image(str(out_dir / folder / name))
    cor = report.get("corruptions")
    if cor:
        score = cor["score_metric"]
        sevs = [str(s) for s in cor["severities"]]
        panels["eval/corruptions/table"] = wandb.Table(
            columns=["corruption", *[f"severity {s}" for s in sevs], "mean", "drop"],
            data=[[c, *[by[s][score] for s in sevs], cor["per_corruption"][c]["score"],
                   cor["per_corruption"][c]["drop"]] for c, by in cor["table"].items()])
        run.summary.update({f"eval/corruptions/mean_{score}": cor["mean"]["score"],
                            **({"eval/corruptions/mCE": cor["baseline"]["mce"]}
                               if cor.get("baseline") else {}),
                            **({"eval/flip_probability": cor["flip_probability"]["mean"]}
                               if cor.get("flip_probability") else {})})
    ana = report.get("analyses") or {}
    if ana.get("feature_distance"):
        panels["eval/analyses/feature_distance_table"] = wandb.Table(
            columns=["attack", *next(iter(ana["feature_distance"].values()))],
            data=[[a, *d.values()] for a, d in ana["feature_distance"].items()])
    if panels:
        run.log(panels)
    artifact = wandb.Artifact(f"eval-report-{run.id}", type="evaluation")
    artifact.add_file(str(out_dir / "report.json"))
    run.log_artifact(artifact)


def expand_checkpoints(value: Any) -> list[Path]:
    """``ckpt_path``: one file, a list of files, or a run/multirun folder (the checkpoint each
    finished run tested, from its ``metrics.json``)."""
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    out: list[Path] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            runs = sorted(p.rglob("metrics.json"))
            tested = [json.loads(m.read_text()).get("best_checkpoint") for m in runs]
            found = [Path(t) for t in tested if t]
            if not found:
                raise ConfigError(f"ckpt_path={str(p)!r} is a folder with no finished run "
                                  "(no metrics.json naming a tested checkpoint)")
            out += found
        else:
            out.append(p)
    if not out:
        raise ConfigError("ckpt_path is an empty list")
    return out


def evaluate_many(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate each checkpoint of ``ckpt_path`` (its report in its own folder), then write
    one comparison (``comparison.{csv,md,png}``) into ``output_dir`` or this run's folder."""
    paths = expand_checkpoints(cfg.ckpt_path)
    reports = []
    for i, path in enumerate(paths):
        sub = cfg.copy()
        with open_dict(sub):
            sub.ckpt_path = str(path)
            if cfg.get("output_dir"):  # each checkpoint in a folder of its own
                sub.output_dir = str(Path(cfg.output_dir) / f"{i}-{path.parent.parent.name}"
                                     f"-{path.stem}")
        log.info("checkpoint %d of %d: %s", i + 1, len(paths), path)
        reports.append(evaluate(sub))
    out_dir = Path(cfg.output_dir or cfg.paths.output_dir)
    rows = comparison_rows(reports)
    write_comparison(rows, reports, out_dir)
    return {"reports": reports, "comparison": rows, "output_dir": str(out_dir)}


def comparison_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint: clean metrics and, per eps > 0, the weakest result over its attacks
    (the worst case when there is one)."""
    rows = []
    for rep in reports:
        score = rep["score_metric"]
        row = {"checkpoint": rep["checkpoint"], "defense": rep["defense"], "epoch": rep["epoch"],
               "n_images": rep["n_images"], "clean_acc": rep["clean"]["acc"],
               f"clean_{score}": rep["clean"][score],
               "failed_checks": sum(not c["passed"] for c in rep["checks"])}
        for r in rep["results"]:
            if r["eps"] == 0:
                continue
            key = f"robust_{score}@{r['eps_str']}"
            row[key] = min(row.get(key, 1.0), r[score])
            key = f"robust_acc@{r['eps_str']}"
            row[key] = min(row.get(key, 1.0), r["acc"])
        rows.append(row)
    add_corruption_columns(rows, reports)
    return rows


def add_corruption_columns(rows: list[dict[str, Any]], reports: list[dict[str, Any]]) -> None:
    """Corruption columns where the reports have them: the mean score over corruptions and
    severities, its drop from clean, the mean flip probability, and mCE / relative mCE against
    the report's own baseline or else against the first checkpoint of the comparison (the
    same images and corruptions; its own mCE is then 1)."""
    with_c = [r for r in reports if r.get("corruptions")]
    ref = with_c[0]["corruptions"] if with_c else None
    for row, rep in zip(rows, reports, strict=True):
        block = rep.get("corruptions")
        if not block:
            continue
        row[f"corrupt_{block['score_metric']}"] = block["mean"]["score"]
        row["corrupt_drop"] = block["mean"]["drop"]
        if block.get("flip_probability"):
            row["flip_prob"] = block["flip_probability"]["mean"]
        base = block.get("baseline")
        if base is None and all(block.get(k) == ref.get(k) for k in
                                ("set", "severities", "seed", "n_images")):
            base = mce(*corruption_errors(block), *corruption_errors(ref))
            row["mce_vs"] = "checkpoint 0"
        elif base is not None:
            row["mce_vs"] = base["source"]
        if base is not None:
            row["mCE"], row["rel_mCE"] = base["mce"], base["relative_mce"]


def write_comparison(rows: list[dict], reports: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    heads = [f for f in fields if f not in ("checkpoint",)]
    lines = ["# Comparison of checkpoints", "",
             "Robust columns: per radius, the lowest result over the attacks that ran (the "
             "per-sample worst case when there were two or more).", "",
             "| # | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for i, r in enumerate(rows):
        cells = [f"{r.get(h):.4f}" if isinstance(r.get(h), float) else str(r.get(h, "-"))
                 for h in heads]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", *[f"{i}. `{r['checkpoint']}`" for i, r in enumerate(rows)], "",
              "![comparison](comparison.png)", ""]
    lines += comparison_analyses(rows, reports, out_dir)
    (out_dir / "comparison.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = reports[0]["score_metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (row, rep) in enumerate(zip(rows, reports, strict=True)):
        eps = sorted({r["eps"] for r in rep["results"]})
        vals = [rep["clean"][score] if e == 0 else
                min(r[score] for r in rep["results"] if r["eps"] == e) for e in eps]
        ax.plot([e * 255 for e in eps], vals, marker="o", label=f"{i}: {row['defense']}")
    ax.set_xlabel("epsilon (x 1/255)")
    ax.set_ylabel(f"{score} (weakest over attacks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=100)
    plt.close(fig)


def comparison_analyses(rows: list[dict], reports: list[dict], out_dir: Path) -> list[str]:
    """Where the reports hold them: the feature distance of every checkpoint and attack in
    one plot (``comparison_features.png``), the discriminability numbers side by side, and
    each corruption's score (mean over severities) per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[str] = []
    names = [f"{i}: {row['defense']}" for i, row in enumerate(rows)]
    ana = [(n, r["analyses"]) for n, r in zip(names, reports, strict=True)
           if (r.get("analyses") or {}).get("feature_distance")]
    if ana:
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, a in ana:
            for attack, dist in a["feature_distance"].items():
                ax.plot(list(dist), list(dist.values()), marker="o", label=f"{n} / {attack}")
        ax.set_xlabel("stage (shallow to deep)")
        ax.set_ylabel("||f(x') - f(x)|| / ||f(x)||")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "comparison_features.png", dpi=100)
        plt.close(fig)
        lines += ["## Analyses", "",
                  "| checkpoint | features | silhouette | probe acc | probe bal. acc |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {k} | {_fmt(d['silhouette'])} | {_fmt(d['probe_acc'])} | "
                  f"{_fmt(d.get('probe_bal_acc'))} |"
                  for n, a in ana for k, d in (a.get("discriminability") or {}).items()]
        lines += ["", "![feature distance](comparison_features.png)", ""]
    cor = [(n, r["corruptions"]) for n, r in zip(names, reports, strict=True)
           if r.get("corruptions")]
    if cor:
        key = cor[0][1]["score_metric"]
        corr_names = list(dict.fromkeys(c for _, b in cor for c in b["per_corruption"]))
        lines += ["## Common corruptions", "",
                  f"{key} per corruption, averaged over severities "
                  f"{cor[0][1]['severities']}:", "",
                  "| corruption | " + " | ".join(n for n, _ in cor) + " |",
                  "|---|" + "---|" * len(cor)]
        lines.append("| clean | " + " | ".join(f"{b['clean'][key]:.3f}" for _, b in cor) + " |")
        lines += [f"| {c} | " + " | ".join(_fmt(b["per_corruption"].get(c, {}).get("score"))
                                            for _, b in cor) + " |" for c in corr_names]
        lines.append("| **mean** | " + " | ".join(f"{b['mean']['score']:.3f}" for _, b in cor)
                     + " |")
        lines += [""]
    return lines


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.csv, accuracy_vs_eps.png and report.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    metric_names = list(report["clean"])
    fields = ["attack", "norm", "eps", "eps_str", "steps", "restarts", "seconds",
              "images_attacked", *metric_names]
    tmp = out_dir / "report.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerow({"attack": "clean", "norm": "", "eps": 0.0, "eps_str": "0", "steps": 0,
                         "restarts": 0, **report["clean"]})
        for row in report["results"]:
            writer.writerow({k: row.get(k) for k in fields})
    tmp.replace(out_dir / "report.csv")
    plot_report(report, out_dir / "accuracy_vs_eps.png")
    (out_dir / "report.md").write_text(summary_markdown(report))


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["acc", report["score_metric"]] if report["score_metric"] != "acc" else ["acc"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name in dict.fromkeys(r["attack"] for r in report["results"]):  # with worst
            rows = sorted((r for r in report["results"] if r["attack"] == name),
                          key=lambda r: r["eps"])
            ax.plot([r["eps"] * 255 for r in rows], [r[metric] for r in rows], marker="o",
                    label=name.upper())
        ax.axhline(report["clean"][metric], color="gray", ls="--", lw=1, label="clean")
        ax.set_xlabel("epsilon (x 1/255, L-inf)" if all(
            a["norm"] == "linf" for a in report["attacks"].values()) else "epsilon (x 1/255)")
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{metric} vs epsilon ({report['split']}, n={report['n_images']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reading(report: dict[str, Any]) -> str:
    """A few plain sentences: what the strongest evaluation left of the clean score, against
    chance, and whether the checks let the numbers stand."""
    score = report["score_metric"]
    clean, chance = report["clean"][score], report["chance"][score]
    rows = [r for r in report["results"] if r["eps"] > 0]
    if not rows:
        return f"Only eps = 0 was evaluated: clean {score} {clean:.4f}."
    top = max(r["eps"] for r in rows)
    at_top = [r for r in rows if r["eps"] == top]
    worst = next((r for r in at_top if r["attack"].startswith("worst")), None) or \
        min(at_top, key=lambda r: r[score])
    what = "the per-sample worst case over all attacks" if worst["attack"].startswith("worst") \
        else worst["attack"]
    text = (f"Clean {score} is {clean:.4f} (chance {chance:.4f}). Under {what} at "
            f"{worst['eps_str']} it is {worst[score]:.4f}, "
            f"{worst[score] / clean:.0%} of clean." if clean > 0 else "")
    if worst[score] <= chance + 1e-9:
        text += " That is at or below chance: no robustness at this radius."
    bad = [c for c in report.get("checks") or [] if not c["passed"]]
    n_checks = len(report.get("checks") or [])
    text += (f" {len(bad)} of {n_checks} honesty checks FAILED (listed below): read the robust "
             "numbers as upper bounds." if bad else
             f" All {n_checks} honesty checks passed.")
    return text


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_markdown(report: dict[str, Any]) -> str:
    score = report["score_metric"]
    lines = [
        "# Robustness report",
        "",
        f"- checkpoint: `{report['checkpoint']}` (epoch {report['epoch']})",
        f"- data: `{report['dataset']}`, split `{report['split']}`, {report['n_images']} images"
        + (f" ({report['subset']})" if report.get("subset") else "") + f", task {report['task']}",
        f"- backbone `{report['backbone']}`, defense `{report['defense']}`, trained at "
        f"{report['train_threat']}",
        "- clean: " + ", ".join(f"{k} {v:.4f}" for k, v in report["clean"].items()),
        f"- evaluation `{report.get('evaluation')}`, {report.get('precision')} on "
        f"{report.get('devices')} device(s); software: " + ", ".join(
            f"{k} {v}" for k, v in (report.get("software") or {}).items() if v),
        f"- chance level: {score} {report['chance'][score]:.4f} (a constant predictor)",
        "",
        reading(report),
        "",
        f"| attack | norm | eps | steps | restarts | acc | {score} | images attacked | "
        "seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        steps, restarts, n_att, secs = (r.get(k) if r.get(k) is not None else "-" for k in (
            "steps", "restarts", "images_attacked", "seconds"))
        lines.append(f"| {r['attack']} | {r['norm']} | {r['eps_str']} | {steps} | "
                     f"{restarts} | {r['acc']:.4f} | {r[score]:.4f} | {n_att} | {secs} |")
    if report.get("cascade") and report["cost"]["images_spared"] is not None:
        cost = report["cost"]
        lines += ["", "Cascade (as AutoAttack runs its components): at each radius every attack "
                  "ran only on the images the earlier ones had not fooled, so each row after "
                  "the first is the worst case up to that attack. It spared "
                  f"{cost['images_spared']:.0%} of the attack calls "
                  f"({cost['images_attacked']} images attacked, {cost['total_seconds']} s)."]
    for name, why in (report.get("skipped_attacks") or {}).items():
        lines += ["", f"- **skipped** `{name}`: {why}"]
    per_class = [k for k in report["clean"] if "/" in k]
    if per_class:
        strongest = {}
        for r in report["results"]:  # the largest eps of each attack
            if r["eps"] >= strongest.get(r["attack"], {"eps": -1})["eps"]:
                strongest[r["attack"]] = r
        heads = [f"{r['attack']} @ {r['eps_str']}" for r in strongest.values()]
        lines += ["", f"Per class ({per_class[0].split('/')[0]}):", "",
                  "| class | clean | " + " | ".join(heads) + " |",
                  "|---|---|" + "---|" * len(heads)]
        for key in per_class:
            cells = [f"{report['clean'][key]:.4f}"] + [f"{r[key]:.4f}" for r in strongest.values()]
            lines.append(f"| {key.split('/', 1)[1]} | " + " | ".join(cells) + " |")
    checks = report.get("checks") or []
    if checks:
        lines += ["", "Honesty checks (AutoAttack's flags, Carlini et al. 2019):", ""]
        lines += [f"- {'ok' if c['passed'] else '**FAILED**'} {c['check']}: {c['detail']}"
                  for c in checks]
    lines += ["", "![accuracy vs epsilon](accuracy_vs_eps.png)", ""]
    ana = report.get("analyses") or {}
    if ana.get("files"):
        lines += [f"## Analyses (Xu et al. 2021): {ana['n_images']} images, "
                  f"{', '.join(ana['attacks'])} at {ana['eps']}", ""]
        if ana.get("feature_distance"):
            stages = next(iter(ana["feature_distance"].values()))
            lines += ["Relative feature distance ||f(x') - f(x)|| / ||f(x)|| per stage:", "",
                      "| attack | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
            lines += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in d.values()) + " |"
                      for a, d in ana["feature_distance"].items()]
        if ana.get("discriminability"):
            lines += ["", "Penultimate features: silhouette of the classes and a linear "
                      "probe's cross-validated accuracy and balanced accuracy:", "",
                      "| features | silhouette | probe acc | probe bal. acc |",
                      "|---|---|---|---|"]
            lines += [f"| {k} | {_fmt(d['silhouette'])} | {_fmt(d['probe_acc'])} | "
                      f"{_fmt(d.get('probe_bal_acc'))} |"
                      for k, d in ana["discriminability"].items()]
        if "label_correlation" in ana:
            lines += ["", "Frobenius distance of the finding correlation to the ground truth's: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in
                                  ana["label_correlation"]["distance_to_truth"].items())]
        lines += [""] + [f"![{k}](analyses/{f})" for k, f in ana["files"].items()] + [""]
    if report.get("corruptions"):
        lines += corruption_markdown(report["corruptions"], "corruptions")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    rank0 = not torch.distributed.is_available() or not torch.distributed.is_initialized() \
        or torch.distributed.get_rank() == 0
    with exit_on_config_error(log):
        if isinstance(cfg.ckpt_path, ListConfig) or Path(str(cfg.ckpt_path)).is_dir():
            many = evaluate_many(cfg)
            if rank0:
                print((Path(many["output_dir"]) / "comparison.md").read_text(), flush=True)
            print(f"comparison written to {many['output_dir']}", flush=True)
            return
        report = evaluate(cfg)
    if rank0:
        print(summary_markdown(report), flush=True)
    print(f"report written to {report['output_dir']}", flush=True)


if __name__ == "__main__":
    main()
