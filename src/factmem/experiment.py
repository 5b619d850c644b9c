"""Experiments: variants x seeds x stages -> a run directory -> the results table.

`prepare` checks everything (config, data, tokenisation, model) before the run directory
(factmem.rundir) is created. Then each variant/seed runs (in turn, or several at a time in worker
processes: factmem.jobs) in short steps: restore the stages an earlier run finished (or copy
those an identical variant/seed trained, factmem.reuse), evaluate the base model, run each
remaining stage (train, evaluate, record), and finish with the accuracy record. A run killed at
any moment continues when the same command is run again.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factmem import distributed as dist
from factmem import files, rundir, signals
from factmem import jobs as parallel
from factmem.compare import comparison, write_comparison
from factmem.config import (
    EvalConfig,
    Experiment,
    ExperimentConfig,
    StageConfig,
    dump_yaml,
    to_dict,
)
from factmem.data import Example
from factmem.errors import FactmemError
from factmem.evaluate import evaluate_examples, summarize
from factmem.mixing import build_mixture
from factmem.models import Formatter, describe, load_model, load_tokenizer, without_model_writes
from factmem.plan import RunPlan, TokenCounter, plan_stage
from factmem.results import summary_table, write_summary
from factmem.reuse import ReusePlan, unit_name
from factmem.sets import SetCache
from factmem.tracking import RunTracker, check_trackers
from factmem.train import train_stage
from factmem.train.checkpoint import CheckpointOnSigterm, StageCheckpointer, save_pretrained_dir
from factmem.train.guard import FiniteGuard
from factmem.train.lora import begin_stage, end_stage
from factmem.train.regularizers import build_regularizers
from factmem.train.retention import retention_callbacks
from factmem.validate import check_set, check_special_tokens, model_context

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Before anything is written


@dataclass
class Prepared:
    """What `prepare` hands the run: the built sets, the tokenizer and the plan it counted."""

    cache: SetCache
    tokenizers: dict[tuple[str, bool], Any]  # per model (name, trust_remote_code)
    plan: RunPlan

    def tokenizer(self, cfg: ExperimentConfig):
        return self.tokenizers[tokenizer_key(cfg)]


def tokenizer_key(cfg: ExperimentConfig) -> tuple[str, bool]:
    return cfg.model.name, cfg.model.trust_remote_code


def prepare(exp: Experiment) -> Prepared:
    """Everything that can fail on bad input, before anything is written: build every set of
    every variant and the mixture of every stage for every seed, load the tokenizer (not the
    weights), and tokenise every example that will be trained on or evaluated. `--dry-run` runs
    exactly this, so it refuses what the real run refuses; the counts become the run's plan."""
    check_trackers(sorted({t for cfg in exp.variants.values() for t in cfg.output.report_to}))
    cache = SetCache()
    tokenizers: dict[tuple[str, bool], Any] = {}
    contexts: dict[tuple[str, bool], int | None] = {}
    counters: dict[tuple[Any, ...], TokenCounter] = {}
    plan = RunPlan(exp.name, exp.first_variant.model.name)
    reuse = ReusePlan(exp)  # which stages are copied, not trained
    for vname, cfg in exp.variants.items():
        sets = cache.sets(cfg)
        for name, examples in sets.items():
            check_set(name, examples)  # empty sets, duplicate ids
        tkey = tokenizer_key(cfg)  # a variant may change the model: its own tokenizer
        if tkey not in tokenizers:
            tokenizers[tkey] = load_tokenizer(cfg.model)
            contexts[tkey] = model_context(cfg.model)
        fkey = (*tkey, cfg.model.system_prompt, cfg.model.max_length, cfg.model.template)
        if fkey not in counters:
            counters[fkey] = TokenCounter(Formatter.for_model(tokenizers[tkey], cfg.model),
                                          contexts[tkey])
        count = counters[fkey]
        for name, examples in sets.items():  # special tokens in the data, by file and line
            check_special_tokens(name, cfg.sets[name], examples, count.fmt.specials)
        plan_variant(exp, vname, sets, count, plan, reuse)
        for name in cfg.track:
            count.lengths(sets[name])  # tokenised and checked: evaluated after every stage
            plan.tracked.setdefault(name, len(sets[name]))
    return Prepared(cache, tokenizers, plan)


def plan_variant(exp: Experiment, vname: str, sets: dict[str, list[Example]],
                 count: TokenCounter, plan: RunPlan, reuse: ReusePlan) -> None:
    """The stages of one variant into `plan`, for every seed (mixing items are drawn per
    training seed: every mixture is built and tokenised)."""
    cfg = exp.variants[vname]
    for seed in cfg.seeds:
        src = reuse.sources.get((vname, seed))
        for k, stage in enumerate(cfg.stages):
            try:
                mixture = build_mixture(cfg, k, sets, seed)
            except FactmemError as e:
                where = f"variants.{vname}: " if len(exp.variants) > 1 else ""
                raise type(e)(f"{exp.source}: {where}{e}") from None
            plan.stages.append(plan_stage(
                vname, seed, stage, mixture, count,
                reused_from=unit_name(src.unit) if src and k <= src.k else None))


def dry_run(exp: Experiment, output_dir: str | None = None, overwrite: bool = False
            ) -> tuple[RunPlan, str]:
    """`factmem run --dry-run`: every check the real run makes before it writes (the same
    `prepare`, and the run directory read but not locked or written), and the plan. Returns the
    plan and a line on what the run would do with its directory."""
    root = rundir.checked_root(output_dir, exp.first_variant.output.dir, exp.name)
    with without_model_writes():  # an embedded model not yet converted is read in place
        plan = prepare(exp).plan
    what = rundir.check_run_dir(root, overwrite, exp.raw, resolved_config(exp))
    if what == "new":
        return plan, f"would write a new run directory {root}"
    if what == "restart":
        return plan, f"would delete and rewrite the run directory {root} (--restart)"
    paths = rundir.RunPaths(root)
    runs = [(v, s) for v, c in exp.variants.items() for s in c.seeds]
    done = sum(rundir.is_seed_finished(paths.seed_dir(v, s)) for v, s in runs)
    return plan, (f"would continue the run in {root}: {done} of {len(runs)} variant/seed runs "
                  "finished (they are skipped)")


def resolved_config(exp: Experiment) -> dict[str, Any]:
    """Every variant fully resolved, as plain JSON data (as the run directory keeps it)."""
    return json.loads(json.dumps({n: to_dict(c) for n, c in exp.variants.items()}))


# --------------------------------------------------------------------------------------------
# The run


def run_experiment(
    exp: Experiment,
    output_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    jobs: int = 1,
    threads_per_job: int | None = None,
    break_lock: bool = False,
) -> dict[str, Any]:
    """`factmem run`: `jobs` variant/seeds at a time, each in a process of its own if more than
    one (factmem.jobs), with `threads_per_job` torch threads (default: its share of the cores)."""
    parallel.check_jobs(jobs, threads_per_job)
    root = rundir.checked_root(output_dir, exp.first_variant.output.dir, exp.name)
    prepared = prepare(exp)
    dist.check_fsdp_run([st for cfg in exp.variants.values() for st in cfg.stages])
    accelerator = dist.make_accelerator()
    lock = rundir.RunLock(root, break_lock=break_lock)  # one writer per run directory
    restore_sigterm = signals.handle_sigterm()  # SIGTERM stops cleanly (factmem.signals)
    try:
        # the main process takes the lock and checks the run directory; every process gets
        # its verdict, so that a refusal stops them all instead of leaving the others waiting
        main_process_decides(accelerator,
                             lambda: open_run_dir(exp, root, prepared.cache, lock, overwrite))
        return run_all(exp, root, prepared, accelerator, progress, jobs, threads_per_job)
    finally:
        lock.release()
        restore_sigterm()


def main_process_decides(accelerator, action) -> None:
    """Run `action` on the main process only; if it fails, every process stops with its error
    (the main process re-raises its own exception, the others a FactmemError with its text)."""
    from accelerate.utils import broadcast_object_list

    error, failure = [None], None
    if accelerator.is_main_process:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
            failure, error = e, [str(e) if isinstance(e, FactmemError)
                                 else f"the main process failed: {type(e).__name__}: {e}"]
    broadcast_object_list(error)
    if failure is not None:
        raise failure
    if error[0] is not None:
        raise FactmemError(error[0])


def open_run_dir(exp: Experiment, root: Path, cache: SetCache, lock: rundir.RunLock,
                 overwrite: bool) -> None:
    """Lock the run directory, refuse a changed config (or start over), write the config.
    Checked before the lock (so that a refusal writes nothing) and again under it."""
    resolved = {n: to_dict(c) for n, c in exp.variants.items()}
    rundir.check_run_dir(root, overwrite, exp.raw, resolved_config(exp))
    lock.acquire()
    what = rundir.check_run_dir(root, overwrite, exp.raw, resolved_config(exp))
    if what == "restart":
        rundir.remove_run_dir(root)
    elif what == "continue":  # the same command again continues the run
        log.info("continuing the run in %s (finished stages are kept)", root)
    root.mkdir(parents=True, exist_ok=True)
    rundir.mark(root)
    files.write_text(root / rundir.CONFIG_FILE, dump_yaml(exp.raw))
    files.write_json(root / rundir.RESOLVED_FILE, resolved)
    if cache.reports:  # items dropped by max_tokens / yet-to-learn filtering, per set
        files.write_json(root / rundir.DATA_REPORT_FILE, cache.reports)


def run_all(exp: Experiment, root: Path, prepared: Prepared, accelerator, progress: bool,
            jobs: int = 1, threads_per_job: int | None = None) -> dict[str, Any]:
    """Every variant and seed (in the locked run directory): in turn, or `jobs` at a time in
    worker processes; then the summary and the comparison with the baselines."""
    reuse = ReusePlan(exp, root, enabled=accelerator.num_processes == 1)
    if accelerator.num_processes > 1 and reuse.shared:
        log.info("stage reuse is off with %d processes (weights are not kept across variants): "
                 "variants that share stages train them again", accelerator.num_processes)
    timings = rundir.RunTimings(root, enabled=accelerator.is_main_process)
    if jobs > 1:
        results = parallel.run_parallel(exp, root, prepared.cache, reuse, timings, jobs,
                                        threads_per_job)
    else:
        if threads_per_job:
            torch.set_num_threads(threads_per_job)
        results = run_in_turn(exp, root, prepared, accelerator, progress, reuse, timings)
    summary = summary_table(exp, results)
    if accelerator.is_main_process:
        write_summary(root, summary)
        comp = comparison(root, exp)
        if comp is not None:
            write_comparison(root, comp)
            summary["comparison"] = comp
    accelerator.wait_for_everyone()
    summary["run_dir"] = str(root)
    return summary


def run_in_turn(exp: Experiment, root: Path, prepared: Prepared, accelerator, progress: bool,
                reuse: ReusePlan, timings: rundir.RunTimings
                ) -> dict[str, dict[int, dict[str, Any]]]:
    """Every variant and seed, one after the other, in this process (and the others of an
    `accelerate launch`): their accuracy records."""
    paths = rundir.RunPaths(root)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for vname, cfg in exp.variants.items():
        results[vname] = {}
        for seed in cfg.seeds:
            seed_dir = paths.seed_dir(vname, seed)
            finished_before = rundir.is_seed_finished(seed_dir)
            t0 = time.perf_counter()
            results[vname][seed] = run_variant_seed(
                cfg, vname, seed, prepared.cache.sets(cfg), prepared.tokenizer(cfg), accelerator,
                seed_dir, progress, reuse,
            )
            if finished_before:
                timings.keep_earlier(f"{vname}/seed{seed}", cfg, seed_dir)
            else:
                timings.record(f"{vname}/seed{seed}", time.perf_counter() - t0)
            if accelerator.is_main_process:  # weights kept for it that it has copied now
                reuse.sweep()
    return results


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
               **baseline_metrics(regularizers, parts.info)}
    record_stage(run, k, result.log, metrics, ckpt)
    log_stage(run.variant, run.seed, stage.name, result, run.matrix[stage.name])


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
