"""One variant with one seed, through all its stages: restore the stages an earlier run
finished (or copy those an identical variant/seed trained, factmem.reuse), evaluate the base
model, run each remaining stage (train, evaluate, record), and finish with the accuracy record.
A run killed at any moment continues from its files. factmem.experiment runs these in turn,
factmem.jobs in worker processes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factmem import distributed as dist
from factmem import files, rundir
from factmem.config import (
    EvalConfig,
    ExperimentConfig,
    StageConfig,
    to_dict,
)
from factmem.data import Example
from factmem.evaluate import evaluate_examples, summarize
from factmem.mixing import build_mixture
from factmem.models import Formatter, describe, load_model
from factmem.reuse import ReusePlan
from factmem.tracking import RunTracker
from factmem.train import train_stage
from factmem.train.checkpoint import CheckpointOnSigterm, StageCheckpointer, save_pretrained_dir
from factmem.train.guard import FiniteGuard
from factmem.train.lora import begin_stage, end_stage
from factmem.train.regularizers import build_regularizers
from factmem.train.retention import retention_callbacks

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# One variant with one seed


@dataclass
class SeedRun:
    """One variant with one seed: what its steps share. `out` is RUN_DIR/VARIANT/seedS."""

    cfg: ExperimentConfig
    variant: str
    seed: int
    sets: dict[str, list[Example]]
    tokenizer: Any
    accelerator: Any
    out: Path
    progress: bool
    reuse: ReusePlan | None
    tracker: RunTracker
    model: Any = None
    fmt: Formatter | None = None
    matrix: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    offset: int = 0  # tracking: optimizer steps of this variant and seed before this stage

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unit(self) -> tuple[str, int]:
        return self.variant, self.seed

    @property
    def tracked(self) -> dict[str, list[Example]]:
        return {name: self.sets[name] for name in self.cfg.track}

    def where(self, stage: StageConfig) -> str:
        return f"{self.variant} seed{self.seed} {stage.name}"

    def plain_model(self):
        return self.accelerator.unwrap_model(self.model)


def run_variant_seed(
    cfg: ExperimentConfig,
    variant: str,
    seed: int,
    sets: dict[str, list[Example]],
    tokenizer,
    accelerator,
    out: Path,
    progress: bool,
    reuse: ReusePlan | None = None,
) -> dict[str, Any]:
    """Train one variant with one seed through all stages; returns its accuracy record.
    Continues an interrupted run: finished stages in `out` are skipped (factmem.rundir)."""
    if rundir.is_seed_finished(out):
        log.info("%s seed%d: finished in an earlier run, skipped", variant, seed)
        return rundir.read_accuracy(out)
    # out = RUN_DIR/VARIANT/seedS; trackers log on the main process only
    tracker = RunTracker(cfg.output.report_to, out.parents[1], cfg.name,
                         rundir.safe_name(variant), seed, to_dict(cfg),
                         enabled=accelerator.is_main_process)
    run = SeedRun(cfg, variant, seed, sets, tokenizer, accelerator, out, progress, reuse, tracker)
    try:
        return run_stages(run)
    finally:
        tracker.finish()


def run_stages(run: SeedRun) -> dict[str, Any]:
    set_seed(run.seed)
    run.fmt = Formatter.for_model(run.tokenizer, run.cfg.model)
    run.model = load_model(run.cfg.model)
    done, reused = restore_stages(run)
    run.model = dist.prepare_model(run.model, run.accelerator)  # sharded under FSDP
    if done >= 0:
        save_copied_checkpoint(run, done)
    run.offset = tracking_offset(run, done, reused)
    if done < 0:
        evaluate_base(run)
    for k in range(done + 1, len(run.cfg.stages)):
        run_stage(run, k)
    return finish(run)


def restore_stages(run: SeedRun) -> tuple[int, bool]:
    """Load the model after the stages already run: by an earlier run in `out`, or by an
    identical variant/seed, whose stages are copied into `out` first (factmem.reuse). Returns
    (index of the last of them or -1, whether they were copied now)."""
    copied = run.reuse is not None and run.main and run.reuse.copy_source(run.unit) >= 0
    return restore_finished(run.cfg, run.out, run.model, run.matrix), copied


def restore_finished(cfg: ExperimentConfig, out: Path, model, matrix: dict) -> int:
    """Load the model after the last stage an earlier run finished in `out` and those stages'
    results; returns its index, or -1 if none."""
    last = -1
    for k in range(len(cfg.stages)):
        if not rundir.is_finished(rundir.stage_path(out, cfg, k)):
            break
        last = k
    if last < 0:
        return -1
    stage_dir = rundir.stage_path(out, cfg, last)
    if not rundir.has_stage_weights(stage_dir):
        log.warning("%s: stage %s finished but its weights are gone; redoing the stages", out,
                    cfg.stages[last].name)
        return -1
    rundir.load_stage_weights(model, stage_dir)
    matrix[rundir.BASE_STAGE] = rundir.read_eval(rundir.base_dir(out))
    for k in range(last + 1):
        matrix[cfg.stages[k].name] = rundir.read_eval(rundir.stage_path(out, cfg, k))
    log.info("%s: stages 1-%d finished earlier; continuing from %s", out, last + 1,
             rundir.final_weights_dir(stage_dir))
    return last


def save_copied_checkpoint(run: SeedRun, done: int) -> None:
    """The analysis checkpoint of the last stage restored, where the variant keeps one and it
    has none: a copied stage whose source kept none (written from the weights after it)."""
    stage = run.cfg.stages[done]
    path = rundir.checkpoint_dir(rundir.stage_path(run.out, run.cfg, done))
    if run.cfg.output.saves_checkpoint(stage.name) and not path.is_dir():
        save_pretrained_dir(run.plain_model(), run.tokenizer, path, write=run.main)


def tracking_offset(run: SeedRun, done: int, reused: bool) -> int:
    """Optimizer steps of stages 1..done+1, for the trackers' step axis. Copied stages were
    trained elsewhere: they are logged now, from their files; a continued run's finished stages
    were logged by the earlier run."""
    if not run.tracker.active:
        return 0
    if not reused:
        return sum(rundir.read_metrics(rundir.stage_path(run.out, run.cfg, k))["train"]["steps"]
                   for k in range(done + 1))
    run.tracker.log_eval(run.matrix[rundir.BASE_STAGE], 0)
    offset = 0
    for k in range(done + 1):
        offset += run.tracker.log_stage_files(rundir.stage_path(run.out, run.cfg, k), k, offset)
    return offset


def evaluate_base(run: SeedRun) -> None:
    """The tracked sets before any training (read back if an earlier run evaluated them)."""
    base = rundir.base_dir(run.out)
    if rundir.is_finished(base):
        run.matrix[rundir.BASE_STAGE] = rundir.read_eval(base)
        return
    evaluate_tracked(run, rundir.BASE_STAGE, base)
    run.tracker.log_eval(run.matrix[rundir.BASE_STAGE], 0)
    if run.main:
        files.write_json(rundir.metrics_file(base), {"eval": run.matrix[rundir.BASE_STAGE],
                                                  "model": describe(run.plain_model())})


def evaluate_tracked(run: SeedRun, stage_name: str, stage_dir: Path) -> None:
    """Every tracked set into the matrix row `stage_name` (and its predictions, if kept)."""
    run.matrix[stage_name] = {}
    ev = run.cfg.eval
    for set_name, examples in run.tracked.items():
        preds = evaluate_examples(run.plain_model(), run.fmt, examples, ev.mode, ev.batch_size,
                                  ev.max_new_tokens, ev.match)
        run.matrix[stage_name][set_name] = summarize(preds)
        if run.main and run.cfg.output.save_predictions:
            files.write_jsonl(rundir.predictions_file(stage_dir, set_name),
                           (p.to_json() for p in preds))


# --------------------------------------------------------------------------------------------
# One stage


def run_stage(run: SeedRun, k: int) -> None:
    """Train stage k (continuing from its in-stage checkpoint, if any), evaluate the tracked
    sets and record the stage."""
    cfg, stage = run.cfg, run.cfg.stages[k]
    stage_dir = rundir.stage_path(run.out, cfg, k)
    mixture = build_mixture(cfg, k, run.sets, run.seed)
    if run.main:
        files.write_json(stage_dir / rundir.MANIFEST_FILE, mixture.manifest())
    check = memorization_set(stage, run.sets)
    log_memorization_watch(stage, memorization_watch(stage, cfg.eval, check))
    run.model, parts = begin_stage(run.model, stage, run.accelerator)  # LoRA, freezing
    previous = cfg.stages[k - 1] if k > 0 else None
    regularizers = build_regularizers(stage, previous_factoids(previous, run.sets),
                                      mixture.ids("mix"), stage_dir)
    ckpt = StageCheckpointer(rundir.resume_dir(stage_dir), cfg.output.checkpoint_every,
                             write=run.main)
    result = train_stage(
        run.model, run.accelerator, run.fmt, mixture.examples(), stage.train, seed=run.seed,
        memorize_check=check, eval_cfg=cfg.eval, desc=run.where(stage), progress=run.progress,
        callbacks=stage_callbacks(run, k, stage_dir, ckpt, regularizers),
        groups=mixture.groups(),
    )
    run.model = end_stage(run.model, parts, run.accelerator)
    evaluate_tracked(run, stage.name, stage_dir)
    run.offset += result.steps
    run.tracker.log_eval(run.matrix[stage.name], run.offset)
    metrics = {"train": {**result.to_json(), **memorization_watch(stage, cfg.eval, check)},
               "eval": run.matrix[stage.name], "seconds": round(result.seconds, 2),
               **resumed_after(result),
               **baseline_metrics(regularizers, parts.info)}
    record_stage(run, k, result.log, metrics, ckpt)
    log_stage(run.variant, run.seed, stage.name, result, run.matrix[stage.name])


def resumed_after(result) -> dict[str, float]:
    """The stage's training seconds before the stop it continued from (timing.json adds them
    to the variant/seed's wall time); nothing for a stage trained in one go."""
    before = round(result.seconds_before_resume, 2)
    return {"resumed_after_seconds": before} if before > 0 else {}


def stage_callbacks(run: SeedRun, k: int, stage_dir: Path, ckpt: StageCheckpointer,
                    regularizers: list) -> list:
    # order matters: the regularizers anchor (EWC Fisher, L2 weights, KL teacher) in their
    # on_stage_start, before `ckpt` restores mid-stage weights on resume, so a resumed stage
    # keeps the anchor of the model as it entered the stage (tests/reliability); the guard
    # goes before `ckpt`, so that a non-finite state is never saved
    stage = run.cfg.stages[k]
    retention = retention_callbacks(run.cfg, run.tracked, stage_dir, stage.name, run.main)
    return [FiniteGuard(ckpt, run.where(stage)), *regularizers, *retention, ckpt,
            run.tracker.callback(k, run.offset, retention[0] if retention else None),
            CheckpointOnSigterm(ckpt)]


def record_stage(run: SeedRun, k: int, train_log: list[dict[str, Any]],
                 metrics: dict[str, Any], ckpt: StageCheckpointer) -> None:
    """The stage's weights, then its log and its metrics: the metrics, written last, mark the
    stage as finished. Under FSDP every process takes part in saving weights; otherwise the
    main process writes."""
    stage_dir = rundir.stage_path(run.out, run.cfg, k)
    if run.cfg.output.saves_checkpoint(run.cfg.stages[k].name):
        save_pretrained_dir(run.plain_model(), run.tokenizer, rundir.checkpoint_dir(stage_dir),
                            write=run.main)
    rundir.save_stage_weights(run.plain_model(), stage_dir, write=run.main)
    if not run.main:
        return
    files.write_jsonl(stage_dir / rundir.TRAIN_LOG_FILE, train_log)
    files.write_json(rundir.metrics_file(stage_dir), metrics)
    ckpt.clear()
    if k > 0:  # only the last finished stage's weights are needed to continue
        release_weights(run, k - 1)


def finish(run: SeedRun) -> dict[str, Any]:
    """The accuracy record; written, it marks the variant/seed as finished, and the weights
    kept to continue from go (but those another variant/seed is still to copy)."""
    run.accelerator.free_memory()
    record = rundir.accuracy_record(run.cfg, run.matrix)
    if run.main:
        files.write_json(rundir.accuracy_file(run.out), record)
        for k in range(len(run.cfg.stages)):
            release_weights(run, k)
    return record


def release_weights(run: SeedRun, k: int) -> None:
    """The weights after stage k are no longer needed to continue: they go, unless a later
    variant/seed is still to copy them (factmem.reuse)."""
    if run.reuse is not None:
        run.reuse.release(run.unit, k)
    else:
        rundir.drop_resume_dir(rundir.stage_path(run.out, run.cfg, k))


# --------------------------------------------------------------------------------------------
# What a stage watches and reports


def memorization_set(stage: StageConfig, sets: dict[str, list[Example]]) -> list[Example]:
    """What `until_memorized` watches in a stage: the stage's own set and its joint sets, every
    item of them (a task set too: then 100% by the evaluation's match on the task), never the
    mixing or replay items."""
    return [e for n in (stage.set, *stage.joint) for e in sets[n]]


def memorization_watch(stage: StageConfig, eval_cfg: EvalConfig, check: list[Example]
                       ) -> dict[str, Any]:
    """The metrics entry naming what `until_memorized` waited for (empty for other rules)."""
    if stage.train.stop.rule != "until_memorized":
        return {}
    kinds = sorted({e.kind for e in check})
    return {"memorize_check": {"sets": [stage.set, *stage.joint], "n": len(check),
                               "kinds": kinds, "match": eval_cfg.match, "mode": eval_cfg.mode}}


def log_memorization_watch(stage: StageConfig, watch: dict[str, Any]) -> None:
    check = watch.get("memorize_check")
    if check and "task" in check["kinds"]:
        log.info("%s: until_memorized waits for 100%% on the task set %s (%s match, %s mode, "
                 "%d items), at most %d epochs", stage.name, ", ".join(check["sets"]),
                 check["match"], check["mode"], check["n"], stage.train.stop.epochs)


def previous_factoids(previous: StageConfig | None, sets: dict[str, list[Example]]):
    """The factoids the previous stage memorized (its set and joint sets): EWC's Fisher data."""
    if previous is None:
        return None
    return [e for n in (previous.set, *previous.joint) for e in sets[n] if e.kind == "factoid"]


def baseline_metrics(callbacks, parts_info: dict[str, Any]) -> dict[str, Any]:
    """Regularizer reports (extra memory in bytes) and LoRA/freezing parameter counts."""
    out: dict[str, Any] = {}
    reports = [cb.report() for cb in callbacks if hasattr(cb, "report")]
    if reports:
        out["regularizers"] = reports
    if parts_info:
        out["parameters"] = parts_info
    return out


def log_stage(variant: str, seed: int, stage: str, result,
              row: dict[str, dict[str, float]]) -> None:
    accs = ", ".join(f"{s} {m['accuracy']:.0%}" for s, m in row.items())
    mem = f", memorized at epoch {result.memorized_epoch}" if result.memorized_epoch else ""
    log.info("%s seed%d %s: %d epochs (%s)%s, loss %.4f, %.0fs | %s", variant, seed, stage,
             result.epochs, result.stop_reason, mem, result.final_loss, result.seconds, accs)
