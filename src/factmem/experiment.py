"""Experiments: variants x seeds x stages -> a run directory -> the results table.

`prepare` checks everything (config, data, tokenisation, model) before the run directory
(factmem.rundir) is created. Then each variant/seed runs through its stages
(factmem.seedrun), in turn or several at a time in worker processes (factmem.jobs); then the
summary and the comparison with the baselines. A run killed at any moment continues when the
same command is run again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from factmem import distributed as dist
from factmem import files, rundir, signals
from factmem import jobs as parallel
from factmem.compare import comparison, write_comparison
from factmem.config import (
    Experiment,
    ExperimentConfig,
    dump_yaml,
    to_dict,
)
from factmem.data import Example
from factmem.errors import FactmemError
from factmem.mixing import build_mixture
from factmem.models import Formatter, load_tokenizer, without_model_writes
from factmem.plan import RunPlan, TokenCounter, plan_stage
from factmem.results import summary_table, write_summary
from factmem.reuse import ReusePlan, unit_name
from factmem.seedrun import run_variant_seed
from factmem.sets import SetCache
from factmem.tracking import check_trackers
from factmem.validate import check_set, check_special_tokens, model_context

log = logging.getLogger(__name__)




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
            if not finished_before:
                timings.begin(f"{vname}/seed{seed}", cfg, seed_dir)
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
