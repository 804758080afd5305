"""Attack a trained checkpoint over a grid of epsilons and write a robustness report.

    python evaluate.py ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt
    python evaluate.py ckpt_path=... evaluation=quick      # PGD-20 only (standard | full)
    python evaluate.py ckpt_path=... 'eps_grid=[0,2/255,4/255]' attacks.pgd.restarts=3
    python evaluate.py ckpt_path=... trainer=ddp trainer.devices=4 trainer.precision=bf16-mixed

The checkpoint carries its training config: data, network, and the threat model the attacks use
unless ``threat.*`` is given. The ``evaluation`` preset mounts ``conf/attack`` nodes under
``attacks``; each runs at every eps of ``eps_grid`` through a Lightning ``Trainer``. The report
goes to ``<run dir>/eval/<checkpoint name>/``; several checkpoints also get a comparison. The
pieces: ``lightning_modules/evaluation/``.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, open_dict

from datamodules import complete_stored_config
from lightning_modules.core.config import instantiate_node, register_resolvers
from lightning_modules.core.errors import ConfigError, exit_on_config_error
from lightning_modules.core.threat import parse_eps
from lightning_modules.evaluation import checkpoint as ckpts
from lightning_modules.evaluation.analysis.run import analyses_for_report
from lightning_modules.evaluation.assemble import (
    assemble_report,
    build_certifier,
    honesty_checks,
    stop_if_failed,
)
from lightning_modules.evaluation.certify import certify_summary
from lightning_modules.evaluation.comparison import comparison_rows, write_comparison
from lightning_modules.evaluation.corruptions.benchmark import corruption_benchmark
from lightning_modules.evaluation.corruptions.images import set_for_datamodule
from lightning_modules.evaluation.gap_fit import prepare_gap
from lightning_modules.evaluation.module import (
    EvaluationModule,
    attack_radii,
    build_attacks,
    resume_signature,
)
from lightning_modules.evaluation.preflight import more_steps_preflight
from lightning_modules.evaluation.wandb_log import log_report
from lightning_modules.evaluation.writer import summary_markdown, write_report
from lightning_modules.training import resume

log = logging.getLogger("medrobust.evaluate")
register_resolvers()


def load(path: str, datamodule_overrides: DictConfig | None = None):
    """``(checkpoint, training config, datamodule, network)`` of a medrobust checkpoint."""
    ckpt = ckpts.load_checkpoint(path)
    train_cfg = ckpts.stored_config(ckpt, datamodule_overrides, complete_stored_config)
    return ckpt, train_cfg, instantiate_node(train_cfg, "datamodule"), \
        ckpts.build_network(train_cfg, ckpt)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the grid through a Trainer and write the report (rank 0); returns the report."""
    start = time.perf_counter()
    seed = int(cfg.get("seed") or 0)
    if cfg.get("seed") is not None:
        L.seed_everything(seed, workers=True, verbose=False)
    ckpt, train_cfg, datamodule, net = load(cfg.ckpt_path, cfg.get("datamodule"))
    task, num_classes = train_cfg.datamodule.task, int(train_cfg.datamodule.num_classes)
    threat = ckpts.inherit_threat(cfg, train_cfg)  # before the attack nodes resolve threat.*
    eps_grid = [parse_eps(e, "eps_grid") for e in cfg.eps_grid]
    if not eps_grid:
        raise ConfigError("eps_grid is empty")
    attacks, skipped = build_attacks(cfg.get("attacks"), task)
    options, split = cfg.evaluation, cfg.split
    cascade = bool(options.cascade) and task == "multiclass"
    if split not in ("val", "test"):
        raise ConfigError(f"split={split!r} must be 'val' or 'test'")
    out_dir = ckpts.report_dir(cfg.ckpt_path, cfg.get("output_dir"))
    gap_info = prepare_gap(cfg, attacks, net, task, train_cfg, datamodule, out_dir, ckpt)
    n_split = datamodule.take_subset(split, cfg.get("subset"), seed)
    threat_eps = parse_eps(cfg.threat.eps, "threat.eps")
    radii = attack_radii(options.get("radii"), attacks, threat_eps, eps_grid)
    preflight = None
    if options.probes:  # stronger PGD first: joins the evaluation when it finds more
        eps = threat_eps if any(abs(threat_eps - e) < 1e-9 for e in eps_grid) else max(eps_grid)
        preflight, stronger = more_steps_preflight(
            net, {n: a for n, a in attacks.items() if n not in radii or eps in radii[n]}, eps,
            task, num_classes, cascade, datamodule, split, seed, out_dir, cfg.trainer)
        attacks.update(stronger)
        radii.update({name: [eps] for name in stronger})
    class_names = list(getattr(datamodule, "class_names", None) or []) or None
    certifier, sigma_source = build_certifier(options, train_cfg, task)
    signature = resume_signature(cfg.ckpt_path, ckpt, attacks, eps_grid, cascade, split,
                                 cfg.get("subset"), n_split, cfg.get("seed"),
                                 cfg.get("datamodule"), cfg.trainer,
                                 certifier.describe() if certifier else None, radii)
    try:
        module = EvaluationModule(
            net, task, num_classes, attacks, eps_grid, class_names=class_names, cascade=cascade,
            channels_last=bool((train_cfg.get("module") or {}).get("channels_last")),
            resume_dir=out_dir / "partial" if cfg.resume else None, signature=signature,
            certifier=certifier, seed=seed, radii=radii)
    except ValueError as err:
        raise ConfigError(f"attacks: {err}") from err
    datamodule.shard_eval = True  # every image once across DDP ranks, no padding duplicates
    trainer = instantiate_node(cfg, "trainer", logger=False, callbacks=[],
                               enable_checkpointing=False, use_distributed_sampler=False)
    if trainer.test_loop.inference_mode or trainer.validate_loop.inference_mode:
        raise ConfigError("trainer.inference_mode must be false: attacks need gradients")
    run = trainer.test if split == "test" else trainer.validate
    try:
        with resume.lightning_handles_sigterm():  # Lightning stops after the current batch
            run(module, datamodule=datamodule, verbose=False)
    except SIGTERMException:
        raise interrupted(cfg, out_dir) from None
    if module.n_images == 0:
        raise ConfigError(f"the {split} split is empty")

    rep = assemble_report(cfg.ckpt_path, ckpt, train_cfg, task, num_classes, module, trainer,
                          attacks, skipped, eps_grid, threat, options, split, n_split,
                          class_names, cascade, gap_info)
    if certifier is not None:
        rep.certify = certify_summary(module.certified, certifier, module.certify_seconds,
                                      sigma_source)
    checks = honesty_checks(rep, module, net, attacks, eps_grid, bool(options.probes),
                            before=[preflight] if preflight else [])
    if options.analyses and trainer.is_global_zero:
        rep.analyses = analyses_for_report(options, net, datamodule, split, task, num_classes,
                                           attacks, eps_grid, class_names, out_dir, seed)
    if options.corruptions and trainer.is_global_zero:
        spec = options.corruptions
        set_name = set_for_datamodule(train_cfg.datamodule) if spec.set == "auto" else spec.set
        rep.corruptions = corruption_benchmark(
            spec, net, str(set_name), datamodule, split, task, num_classes, seed, out_dir,
            load_baseline=_baseline)
    rep.checks = [c.as_dict() for c in checks]
    rep.wall_time_s, rep.output_dir = round(time.perf_counter() - start, 1), str(out_dir)
    report = rep.as_dict()
    if trainer.is_global_zero:
        write_report(report, out_dir)
        log_report(cfg, report, out_dir)
        shutil.rmtree(out_dir / "partial", ignore_errors=True)  # the report holds it all now
    if options.strict:
        stop_if_failed(checks, out_dir)
    return report


def interrupted(cfg: DictConfig, out_dir: Path) -> resume.TrainingInterrupted:
    """SIGTERM during the evaluation: the batches done are kept (``resume=true``); one line
    saying where and how to resume."""
    partial = out_dir / "partial"
    kept = len(list(partial.glob("rank*-batch*.pt"))) if cfg.resume else 0
    command = "python evaluate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    where = (f"{kept} batch file(s) kept in {partial}; rerun the same command to resume: "
             f"{command}" if cfg.resume else "resume=false: nothing kept")
    return resume.TrainingInterrupted(f"stopped by SIGTERM while evaluating; {where}")


def _baseline(path: Path):
    """``(task, num_classes, network)`` of a corruption-baseline checkpoint."""
    _, base_cfg, _, base_net = load(str(path))
    return base_cfg.datamodule.task, int(base_cfg.datamodule.num_classes), base_net


def evaluate_many(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate each checkpoint of ``ckpt_path`` (its report in its own folder), then write
    one comparison (``comparison.{csv,md,png}``) into ``output_dir`` or this run's folder."""
    paths = ckpts.expand_checkpoints(cfg.ckpt_path)
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


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    rank0 = not torch.distributed.is_available() or not torch.distributed.is_initialized() \
        or torch.distributed.get_rank() == 0
    try:
        with resume.sigterm_interrupts(), exit_on_config_error(log):
            if isinstance(cfg.ckpt_path, ListConfig) or Path(str(cfg.ckpt_path)).is_dir():
                many = evaluate_many(cfg)
                if rank0:
                    print((Path(many["output_dir"]) / "comparison.md").read_text(), flush=True)
                print(f"comparison written to {many['output_dir']}", flush=True)
                return
            report = evaluate(cfg)
    except resume.TrainingInterrupted as err:  # SIGTERM: the batches done are kept, exit 143
        log.error("%s", err)
        print(f"medrobust: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(resume.SIGTERM_EXIT_CODE) from None
    if rank0:
        print(summary_markdown(report), flush=True)
    print(f"report written to {report['output_dir']}", flush=True)


if __name__ == "__main__":
    main()
