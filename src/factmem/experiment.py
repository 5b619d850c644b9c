"""Experiments: variants x seeds x stages -> run directory -> results table.

Run directory (output.dir/name):
    config.yaml                 the config as given (with --set overrides applied)
    resolved.json               every variant fully resolved
    summary.json, summary.md    variant x tracked set: accuracy after each stage, mean/std over seeds
    VARIANT/seedS/
        accuracy.json           accuracy matrix A[stage][set], graded figures, forgetting
        00-base/                tracked sets evaluated before any training
        01-STAGE/               manifest.json (mixture ids), train_log.jsonl, metrics.json,
                                predictions/SET.jsonl, checkpoint/ (if output.save_checkpoints),
                                retention.jsonl (if eval.retention_every)
Everything is checked (config, data, tokenisation, model) before the directory is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from factmem import distributed as dist
from factmem import io
from factmem.compare import comparison, write_comparison
from factmem.config import Experiment, ExperimentConfig, SetConfig, to_dict
from factmem.data import Example, build_source
from factmem.errors import FactmemError
from factmem.evaluate import evaluate_examples, forgetting, summarize
from factmem.mixing import build_mixture
from factmem.models import Formatter, describe, load_model, load_tokenizer
from factmem.plan import RunPlan, TokenCounter, plan_stage
from factmem.results import summary_table, write_summary
from factmem.resume import (FiniteGuard, RunLock, StageCheckpointer, check_resumable,
                            has_stage_weights, load_stage_weights, save_stage_weights)
from factmem.tracking import RunTracker, check_trackers
from factmem.train import train_stage
from factmem.train.lora import begin_stage, end_stage, is_adapter_model
from factmem.train.regularizers import build_regularizers
from factmem.train.retention import retention_callbacks
from factmem.validate import check_set, model_context

log = logging.getLogger(__name__)

BASE_STAGE = "base"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_set(cfg: SetConfig) -> list[Example]:
    return build_source(cfg.source, cfg.params, cfg.n, cfg.offset, cfg.seed)


class SetCache:
    """Builds each distinct set once across variants (sets are pure functions of their config)."""

    def __init__(self) -> None:
        self._cache: dict[str, list[Example]] = {}
        self.reports: dict[str, Any] = {}  # per set: items dropped by max_tokens / filter
        self._model = None  # the model config of the variant being built (max_tokens, filter)
        self._tokenizers: dict[str, Any] = {}

    def get(self, name: str, cfg: SetConfig) -> list[Example]:
        from factmem.filter import refine_set

        key = json.dumps(to_dict(cfg), sort_keys=True)
        refine = cfg.max_tokens is not None or cfg.filter != "none" or cfg.keep is not None
        if refine:  # the outcome depends on the model
            key += json.dumps(to_dict(self._model), sort_keys=True)
        if key not in self._cache:
            try:
                examples = build_set(cfg)
                if refine:
                    examples = refine_set(name, cfg, examples, self._model, self._tokenizer,
                                          self.reports)
                self._cache[key] = examples
            except FactmemError as e:
                raise type(e)(f"sets.{name}: {e}") from None
        return self._cache[key]

    def _tokenizer(self):
        key = json.dumps(to_dict(self._model), sort_keys=True)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(self._model)
        return self._tokenizers[key]

    def sets(self, cfg: ExperimentConfig) -> dict[str, list[Example]]:
        self._model = cfg.model
        return {name: self.get(name, s) for name, s in cfg.sets.items()}


@dataclass
class RunPaths:
    root: Path

    def seed_dir(self, variant: str, seed: int) -> Path:
        return self.root / safe_name(variant) / f"seed{seed}"


def safe_name(name: str) -> str:
    """A variant name as a single directory name (grid names hold `[`, `=`, `,`)."""
    out = "".join(c if c.isalnum() or c in "-_.=,[]" else "_" for c in name)
    if out in ("", ".", ".."):
        raise FactmemError(f"name {name!r} cannot be used as a directory name")
    return out


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
    plan = RunPlan(exp.name, exp.base.model.name)
    first_use: dict[str, str] = {}  # stage key -> the variant/seed that trains it first
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
        for seed in cfg.seeds:  # mixing items are drawn per training seed: build every one
            keys = stage_keys(cfg, seed)
            for k, stage in enumerate(cfg.stages):
                try:
                    mixture = build_mixture(cfg, k, sets, seed)
                except FactmemError as e:
                    where = f"variants.{vname}: " if len(exp.variants) > 1 else ""
                    raise type(e)(f"{exp.source}: {where}{e}") from None
                reusable = stage.lora is None or stage.lora.merge  # as StageReuse.offer
                plan.stages.append(plan_stage(
                    vname, seed, stage, mixture, count,
                    reused_from=first_use.get(keys[k]) if reusable else None))
                first_use.setdefault(keys[k], f"{vname}/seed{seed}")
        for name in cfg.track:
            count.lengths(sets[name])  # tokenised and checked: evaluated after every stage
            plan.tracked.setdefault(name, len(sets[name]))
    return Prepared(cache, tokenizers, plan)


def run_experiment(
    exp: Experiment,
    output_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    prepared = prepare(exp)
    base = exp.base
    root = Path(output_dir or base.output.dir) / safe_name(exp.name)
    dist.check_fsdp_run([st for cfg in exp.variants.values() for st in cfg.stages])
    accelerator = dist.make_accelerator()
    lock = RunLock(root)  # one writer per run directory
    try:
        # the main process takes the lock and checks the run directory; every process gets
        # its verdict, so that a refusal stops them all instead of leaving the others waiting
        main_process_decides(accelerator,
                             lambda: open_run_dir(exp, root, prepared.cache, lock, overwrite))
        return _run_locked(exp, root, prepared, accelerator, progress)
    finally:
        lock.release()


def dry_run(exp: Experiment, output_dir: str | None = None, overwrite: bool = False
            ) -> tuple[RunPlan, str]:
    """`factmem run --dry-run`: every check the real run makes before it writes (the same
    `prepare`, and the run directory read but not locked or written), and the plan. Returns the
    plan and a line on what the run would do with its directory."""
    plan = prepare(exp).plan
    root = Path(output_dir or exp.base.output.dir) / safe_name(exp.name)
    if not root.exists() or not any(root.iterdir()):
        return plan, f"would write a new run directory {root}"
    if overwrite:
        return plan, f"would delete and rewrite the run directory {root} (--restart)"
    resolved = {n: to_dict(c) for n, c in exp.variants.items()}
    check_resumable(root, exp.raw, json.loads(json.dumps(resolved)))  # refuses a changed config
    paths = RunPaths(root)
    runs = [(v, s) for v, c in exp.variants.items() for s in c.seeds]
    done = sum((paths.seed_dir(v, s) / "accuracy.json").is_file() for v, s in runs)
    return plan, (f"would continue the run in {root}: {done} of {len(runs)} variant/seed runs "
                  "finished (they are skipped)")


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


def open_run_dir(exp: Experiment, root: Path, cache: SetCache, lock: RunLock,
                 overwrite: bool) -> None:
    """Lock the run directory, refuse a changed config (or start over), write the config."""
    lock.acquire()
    resolved = {n: to_dict(c) for n, c in exp.variants.items()}
    if root.exists() and any(root.iterdir()):
        if overwrite:
            shutil.rmtree(root)
        else:  # the same command again continues the run; a changed config is refused
            check_resumable(root, exp.raw, json.loads(json.dumps(resolved)))
            log.info("continuing the run in %s (finished stages are kept)", root)
    root.mkdir(parents=True, exist_ok=True)
    io.write_text(root / "config.yaml", yaml.safe_dump(exp.raw, sort_keys=False))
    io.write_json(root / "resolved.json", resolved)
    if cache.reports:  # items dropped by max_tokens / yet-to-learn filtering, per set
        io.write_json(root / "data.json", cache.reports)


def _run_locked(exp: Experiment, root: Path, prepared: Prepared, accelerator,
                progress: bool) -> dict[str, Any]:
    paths = RunPaths(root)
    reuse = StageReuse(exp, enabled=accelerator.num_processes == 1)
    if accelerator.num_processes > 1 and any(n > 1 for n in reuse.uses.values()):
        log.info("stage reuse is off with %d processes (weights are not kept across variants): "
                 "variants that share stages train them again", accelerator.num_processes)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    timings: dict[str, Any] = {}
    for vname, cfg in exp.variants.items():
        results[vname] = {}
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            results[vname][seed] = run_variant_seed(
                cfg, vname, seed, prepared.cache.sets(cfg), prepared.tokenizer(cfg), accelerator,
                paths.seed_dir(vname, seed), progress, reuse,
            )
            timings[f"{vname}/seed{seed}"] = round(time.perf_counter() - t0, 2)
    summary = summary_table(exp, results)
    if accelerator.is_main_process:
        write_summary(root, summary)
        io.write_json(root / "timing.json", timings)
        comp = comparison(root, exp)
        if comp is not None:
            write_comparison(root, comp)
            summary["comparison"] = comp
    accelerator.wait_for_everyone()
    summary["run_dir"] = str(root)
    return summary


def run_variant_seed(
    cfg: ExperimentConfig,
    variant: str,
    seed: int,
    sets: dict[str, list[Example]],
    tokenizer,
    accelerator,
    out: Path,
    progress: bool,
    reuse: StageReuse | None = None,
) -> dict[str, Any]:
    """Train one variant with one seed through all stages; returns its accuracy matrix.
    Continues an interrupted run: finished stages in `out` are skipped (see factmem.resume)."""
    if (out / "accuracy.json").is_file():
        log.info("%s seed%d: finished in an earlier run, skipped", variant, seed)
        if reuse:
            reuse.finished(stage_keys(cfg, seed))
        return io.read_json(out / "accuracy.json")
    # out = RUN_DIR/VARIANT/seedS; trackers log on the main process only
    tracker = RunTracker(cfg.output.report_to, out.parents[1], cfg.name, safe_name(variant), seed,
                         to_dict(cfg), enabled=accelerator.is_main_process)
    try:
        return _run_stages(cfg, variant, seed, sets, tokenizer, accelerator, out, progress, reuse,
                           tracker)
    finally:
        tracker.finish()


def _run_stages(cfg: ExperimentConfig, variant: str, seed: int, sets: dict[str, list[Example]],
                tokenizer, accelerator, out: Path, progress: bool, reuse: StageReuse | None,
                tracker: RunTracker) -> dict[str, Any]:
    set_seed(seed)
    fmt = Formatter.for_model(tokenizer, cfg.model)
    model = load_model(cfg.model)
    main = accelerator.is_main_process
    tracked = {name: sets[name] for name in cfg.track}
    matrix: dict[str, dict[str, dict[str, float]]] = {}
    keys = stage_keys(cfg, seed)
    done = restore_finished(cfg, out, model, matrix)  # stages finished by an earlier run
    reused = False
    if done >= 0 and reuse:
        reuse.offer(keys[done], model, matrix, out, done)
    elif reuse:
        done = reuse.restore(keys, model, matrix, out)  # stages already run
        reused = done >= 0
        if done >= 0 and main:  # on disk too, so that a crash later on does not lose them
            save_stage_weights(model, stage_path(out, cfg, done) / "resume" / "final")
    model = dist.prepare_model(model, accelerator)  # sharded under FSDP
    offset = 0  # tracking: optimizer steps of this variant and seed before the current stage
    if tracker.active and reused:  # copied stages were trained elsewhere: log them from files
        tracker.log_eval(matrix[BASE_STAGE], 0)
        for k in range(done + 1):
            offset += tracker.log_stage_files(stage_path(out, cfg, k), k, offset)
    elif tracker.active:  # continued run: the finished stages were logged by the earlier run
        offset = sum(io.read_json(stage_path(out, cfg, k) / "metrics.json")["train"]["steps"]
                     for k in range(done + 1))

    def evaluate_tracked(stage_name: str, stage_dir: Path) -> None:
        matrix[stage_name] = {}
        for set_name, examples in tracked.items():
            preds = evaluate_examples(
                accelerator.unwrap_model(model), fmt, examples, cfg.eval.mode,
                cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.match,
            )
            matrix[stage_name][set_name] = summarize(preds)
            if main and cfg.output.save_predictions:
                io.write_jsonl(stage_dir / "predictions" / f"{set_name}.jsonl",
                               (p.to_json() for p in preds))

    if done < 0 and (out / "00-base" / "metrics.json").is_file():
        matrix[BASE_STAGE] = io.read_json(out / "00-base" / "metrics.json")["eval"]
    elif done < 0:
        evaluate_tracked(BASE_STAGE, out / "00-base")
        tracker.log_eval(matrix[BASE_STAGE], 0)
        if main:
            io.write_json(out / "00-base" / "metrics.json",
                          {"eval": matrix[BASE_STAGE],
                           "model": describe(accelerator.unwrap_model(model))})
    for k, stage in enumerate(cfg.stages):
        if k <= done:
            continue
        stage_dir = out / f"{k + 1:02d}-{safe_name(stage.name)}"
        mixture = build_mixture(cfg, k, sets, seed)
        if main:
            io.write_json(stage_dir / "manifest.json", mixture.manifest())
        check = memorization_set(cfg, k, sets)
        watch = memorization_watch(cfg, k, check).get("memorize_check")
        if watch and "task" in watch["kinds"]:
            log.info("%s: until_memorized waits for 100%% on the task set %s (%s match, %s mode, "
                     "%d items), at most %d epochs", stage.name, ", ".join(watch["sets"]),
                     watch["match"], watch["mode"], watch["n"], stage.train.stop.epochs)
        model, parts = begin_stage(model, stage, accelerator)  # LoRA, freezing
        regularizers = build_regularizers(stage, previous_factoids(cfg, k, sets),
                                          mixture.ids("mix"), stage_dir)
        ckpt = StageCheckpointer(stage_dir / "resume", cfg.output.checkpoint_every, write=main)
        # order matters: the regularizers anchor (EWC Fisher, L2 weights, KL teacher) in their
        # on_stage_start, before `ckpt` restores mid-stage weights on resume, so a resumed stage
        # keeps the anchor of the model as it entered the stage (tests/reliability)
        retention = retention_callbacks(cfg, tracked, stage_dir, stage.name, main)
        callbacks = [FiniteGuard(ckpt, f"{variant} seed{seed} {stage.name}"), *regularizers,
                     *retention, ckpt,
                     tracker.callback(k, offset, retention[0] if retention else None)]
        result = train_stage(
            model, accelerator, fmt, mixture.examples(), stage.train, seed=seed,
            memorize_check=check, eval_cfg=cfg.eval,
            desc=f"{variant} seed{seed} {stage.name}", progress=progress, callbacks=callbacks,
            groups=mixture.groups(),
        )
        model = end_stage(model, parts, accelerator)
        evaluate_tracked(stage.name, stage_dir)
        offset += result.steps
        tracker.log_eval(matrix[stage.name], offset)
        # weights first, metrics.json last: metrics.json marks the stage as finished. Under
        # FSDP every process takes part in saving weights; otherwise the main process writes.
        if cfg.output.save_checkpoints:
            save_checkpoint(accelerator.unwrap_model(model), tokenizer, stage_dir / "checkpoint",
                            write=main)
        save_stage_weights(accelerator.unwrap_model(model), stage_dir / "resume" / "final",
                           write=main)
        if main:
            io.write_jsonl(stage_dir / "train_log.jsonl", result.log)
            io.write_json(stage_dir / "metrics.json",
                          {"train": {**result.to_json(), **memorization_watch(cfg, k, check)},
                           "eval": matrix[stage.name], "seconds": round(result.seconds, 2),
                           **baseline_metrics(regularizers, parts.info)})
            ckpt.clear()
            if k > 0:  # only the last finished stage's weights are needed to continue
                shutil.rmtree(stage_path(out, cfg, k - 1) / "resume", ignore_errors=True)
        log_stage(variant, seed, stage.name, result, matrix[stage.name])
        if reuse and not is_adapter_model(accelerator.unwrap_model(model)):  # plain weights only
            reuse.offer(keys[k], accelerator.unwrap_model(model), matrix, out, k)
    if reuse:
        reuse.finished(keys)
    accelerator.free_memory()
    record = accuracy_record(cfg, matrix)
    if main:
        io.write_json(out / "accuracy.json", record)
        for k in range(len(cfg.stages)):  # finished: the temporary weights go
            shutil.rmtree(stage_path(out, cfg, k) / "resume", ignore_errors=True)
    return record


def stage_path(out: Path, cfg: ExperimentConfig, k: int) -> Path:
    return out / f"{k + 1:02d}-{safe_name(cfg.stages[k].name)}"


def restore_finished(cfg: ExperimentConfig, out: Path, model, matrix: dict) -> int:
    """Load the model after the last stage an earlier run finished in `out` (metrics.json
    written) and those stages' results; returns its index, or -1 if none."""
    last = -1
    for k in range(len(cfg.stages)):
        if not (stage_path(out, cfg, k) / "metrics.json").is_file():
            break
        last = k
    if last < 0:
        return -1
    weights = stage_path(out, cfg, last) / "resume" / "final"
    if not has_stage_weights(weights):
        log.warning("%s: stage %s finished but its weights are gone; redoing the stages", out,
                    cfg.stages[last].name)
        return -1
    load_stage_weights(model, weights)
    matrix[BASE_STAGE] = io.read_json(out / "00-base" / "metrics.json")["eval"]
    for k in range(last + 1):
        matrix[cfg.stages[k].name] = io.read_json(stage_path(out, cfg, k) / "metrics.json")["eval"]
    log.info("%s: stages 1-%d finished earlier; continuing from %s", out, last + 1, weights)
    return last


def memorization_set(cfg: ExperimentConfig, k: int, sets: dict[str, list[Example]]
                     ) -> list[Example]:
    """What `until_memorized` watches in stage k: the stage's own set and its joint sets, every
    item of them (a task set too: then 100% by the evaluation's match on the task), never the
    mixing or replay items."""
    stage = cfg.stages[k]
    return [e for n in (stage.set, *stage.joint) for e in sets[n]]


def memorization_watch(cfg: ExperimentConfig, k: int, check: list[Example]) -> dict[str, Any]:
    """The metrics entry naming what `until_memorized` waited for (empty for other rules)."""
    stage = cfg.stages[k]
    if stage.train.stop.rule != "until_memorized":
        return {}
    kinds = sorted({e.kind for e in check})
    return {"memorize_check": {"sets": [stage.set, *stage.joint], "n": len(check),
                               "kinds": kinds, "match": cfg.eval.match, "mode": cfg.eval.mode}}


def previous_factoids(cfg: ExperimentConfig, k: int, sets: dict[str, list[Example]]):
    """The factoids the previous stage memorized (its set and joint sets): EWC's Fisher data."""
    if k == 0:
        return None
    prev = cfg.stages[k - 1]
    return [e for n in (prev.set, *prev.joint) for e in sets[n] if e.kind == "factoid"]


def baseline_metrics(callbacks, parts_info: dict[str, Any]) -> dict[str, Any]:
    """Regularizer reports (extra memory in bytes) and LoRA/freezing parameter counts."""
    out: dict[str, Any] = {}
    reports = [cb.report() for cb in callbacks if hasattr(cb, "report")]
    if reports:
        out["regularizers"] = reports
    if parts_info:
        out["parameters"] = parts_info
    return out


def stage_keys(cfg: ExperimentConfig, seed: int) -> list[str]:
    """Per stage k: a hash of everything that determines the model and results after it (model,
    data, tracked sets, evaluation, stages 1..k, seed). Equal keys mean equal outcomes."""
    common = {"model": to_dict(cfg.model), "sets": to_dict(cfg.sets), "track": cfg.track,
              "eval": to_dict(cfg.eval), "seed": seed}
    return [
        hashlib.sha256(json.dumps({**common, "stages": to_dict(cfg.stages[: k + 1])},
                                  sort_keys=True).encode()).hexdigest()[:16]
        for k in range(len(cfg.stages))
    ]


class StageReuse:
    """Variants that share their first stages (naive and replay share stage 1) train them once.

    After a stage whose key a later variant also has, the model weights and torch RNG state are
    kept in CPU memory; the later variant starts from them and copies the stage directories,
    marked with `reused_from`. Training is deterministic, so the outcome is the same as
    retraining. Single-process runs only (sharded weights are not gathered for this)."""

    def __init__(self, exp: Experiment, enabled: bool = True):
        self.enabled = enabled
        self.uses: dict[str, int] = {}
        for cfg in exp.variants.values():
            for seed in cfg.seeds:
                for key in stage_keys(cfg, seed):
                    self.uses[key] = self.uses.get(key, 0) + 1
        self.kept: dict[str, dict[str, Any]] = {}

    def offer(self, key: str, model, matrix: dict, out: Path, k: int) -> None:
        if self.enabled and self.uses.get(key, 0) > 1 and key not in self.kept:
            self.kept[key] = {
                "state": {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()},
                "rng": torch.get_rng_state(), "matrix": json.loads(json.dumps(matrix)),
                "dir": out, "k": k,
            }

    def restore(self, keys: list[str], model, matrix: dict, out: Path) -> int:
        """Load the furthest kept stage of `keys` into `model`; returns its index or -1."""
        for k in range(len(keys) - 1, -1, -1):
            entry = self.kept.get(keys[k])
            if entry is None:
                continue
            model.load_state_dict(entry["state"])
            torch.set_rng_state(entry["rng"])
            matrix.update(json.loads(json.dumps(entry["matrix"])))
            src: Path = entry["dir"]
            for d in sorted(src.iterdir()):
                if d.is_dir() and d.name[:2].isdigit() and int(d.name[:2]) <= k + 1:
                    shutil.copytree(d, out / d.name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("resume"))
                    io.write_json(out / d.name / "reused_from.json",
                                  {"path": str(src / d.name), "key": keys[k]})
            log.info("reusing stages 1-%d from %s (same settings and seed)", k + 1, src)
            return k
        return -1

    def finished(self, keys: list[str]) -> None:
        for key in keys:
            self.uses[key] = self.uses.get(key, 1) - 1
            if self.uses[key] <= 0:  # no later run needs it
                self.kept.pop(key, None)


def accuracy_record(cfg: ExperimentConfig, matrix: dict[str, dict[str, dict[str, float]]]):
    own_stage = {}
    for st in cfg.stages:
        for s in (st.set, *st.joint):
            if s in cfg.track:
                own_stage[s] = st.name  # the last stage that trained the set
    acc = {st: {s: m["accuracy"] for s, m in row.items()} for st, row in matrix.items()}
    return {
        "stages": list(matrix),
        "sets": list(cfg.track),
        "accuracy": acc,
        "token_acc": {st: {s: m["token_acc"] for s, m in row.items()} for st, row in matrix.items()},
        "logprob": {st: {s: m["logprob"] for s, m in row.items()} for st, row in matrix.items()},
        "forgetting": forgetting(acc, own_stage),
    }


def save_checkpoint(model, tokenizer, path: Path, write: bool = True) -> None:
    """A Hugging Face model directory (loads with from_pretrained). A sharded model is gathered
    one tensor at a time by every process and written by rank 0; otherwise the process where
    `write` is true writes it."""
    sharded = dist.is_sharded(model)
    if not (write or sharded):
        return
    tmp = path.with_name(path.name + ".tmp")
    main = dist.rank() == 0 if sharded else True
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if sharded:
        dist.save_pretrained_gathered(model, tokenizer, tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if main:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    if sharded:
        dist.barrier()


def log_stage(variant: str, seed: int, stage: str, result, row: dict[str, dict[str, float]]) -> None:
    accs = ", ".join(f"{s} {m['accuracy']:.0%}" for s, m in row.items())
    mem = f", memorized at epoch {result.memorized_epoch}" if result.memorized_epoch else ""
    log.info("%s seed%d %s: %d epochs (%s)%s, loss %.4f, %.0fs | %s", variant, seed, stage,
             result.epochs, result.stop_reason, mem, result.final_loss, result.seconds, accs)
