"""`factmem analyze RUN_DIR`: every instrument over every variant, seed and stage of a run.

Reads the run directory through factmem.rundir and writes tidy tables under RUN_DIR/analysis/,
one JSONL row per (variant, seed, stage, set, ...):
    retention.jsonl     per step and fact during training (needs eval.retention_every)
    graded.jsonl        per stage and fact: exact match, token accuracy, gold log-prob
    lens_layers.jsonl   per checkpoint, set, fact and layer: gold rank/prob, top-1
    lens_facts.jsonl    per checkpoint, set and fact: first decodable layer
    reversion.jsonl     per stage (its own set), reverted layer group and fact
    probes.jsonl        per checkpoint, set, probe and fact
    summary.json        aggregates: lens layer diversity, probe and reversion accuracy, and
                        each variant against its baseline (lens_comparison,
                        reversion_comparison: analysis/compare_layers.py)
    layers_comparison.md  those comparisons as tables (when the config names a baseline)
Model-based instruments (lens, reversion, probes) need the stage checkpoints
(`output.save_checkpoints: true`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from factmem import files
from factmem.analysis import compare_layers
from factmem.analysis.logit_lens import layer_diversity, logit_lens
from factmem.analysis.probes import run_probes
from factmem.analysis.reversion import layer_reversion
from factmem.config import ExperimentConfig
from factmem.errors import FactmemError
from factmem.rundir import (
    BASE_STAGE,
    RETENTION_FILE,
    RunLock,
    RunPaths,
    analysis_summary,
    analysis_table,
    checkpoint_dir,
    open_run,
    predictions_file,
    read_jsonl,
    stage_dirs,
)

log = logging.getLogger(__name__)

Tables = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class Instrument:
    """One `--what` choice: the tables it writes and whether it loads stage checkpoints."""

    name: str
    tables: tuple[str, ...]
    model_based: bool


INSTRUMENTS = {i.name: i for i in (
    Instrument("retention", ("retention",), model_based=False),
    Instrument("graded", ("graded",), model_based=False),
    Instrument("lens", ("lens_layers", "lens_facts"), model_based=True),
    Instrument("reversion", ("reversion",), model_based=True),
    Instrument("probes", ("probes",), model_based=True),
)}
WHAT = tuple(INSTRUMENTS)
TABLES = tuple(t for i in INSTRUMENTS.values() for t in i.tables)


def parse_what(text: str | None) -> list[str]:
    if not text or text == "all":
        return list(WHAT)
    what = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in what if w not in INSTRUMENTS]
    if bad:
        raise FactmemError(f"--what: unknown analysis {bad[0]!r}; choose from {', '.join(WHAT)}")
    return what


def needs_models(what: Sequence[str]) -> bool:
    return any(INSTRUMENTS[w].model_based for w in what)


def analyze(run_dir: str | Path, what: Sequence[str] = WHAT, block: int = 1,
            batch_size: int | None = None, variants: Sequence[str] = (),
            progress: bool = True) -> dict[str, Any]:
    """Run the instruments in `what`, write the tables, return summary.json's content.

    `variants` limits the work to those variants; rows of other variants already in the tables
    are kept (analyze variants as they finish, or redo one)."""
    if block < 1:
        raise FactmemError("--block: must be >= 1")
    root, exp = open_run(run_dir)
    unknown = [v for v in variants if v not in exp.variants]
    if unknown:
        raise FactmemError(f"--variant: {unknown[0]!r} is not a variant of this run "
                           f"({', '.join(exp.variants)})")
    # one analysis of a run at a time: each writes the tables it read at its start
    with RunLock(root, purpose="analyze"):
        return _analyze(root, exp, what, block, batch_size, variants, progress)


def _analyze(root: Path, exp, what: Sequence[str], block: int, batch_size: int | None,
             variants: Sequence[str], progress: bool) -> dict[str, Any]:
    from factmem.sets import SetCache

    tables = _kept_rows(root, variants)
    notes: list[str] = []
    todo = {v: cfg for v, cfg in exp.variants.items() if not variants or v in variants}
    # one bar step per stage checkpoint (the model-based instruments are the slow part)
    total = sum(len(c.seeds) * len(c.stages) for c in todo.values()) if needs_models(what) else 0
    bar = tqdm(total=total, desc="analyze", unit="checkpoint", disable=not progress,
               dynamic_ncols=True)
    cache = SetCache()
    for vname, cfg in todo.items():
        sets = cache.sets(cfg)
        for seed in cfg.seeds:
            _analyze_seed(root, vname, seed, cfg, sets, what, block,
                          batch_size or cfg.eval.batch_size, tables, notes, bar)
    bar.close()
    return _write_results(root, exp, tables, what, block, notes)


def _kept_rows(root: Path, variants: Sequence[str]) -> Tables:
    """Rows of the variants not analyzed this time, from the tables already written."""
    tables: Tables = defaultdict(list)
    if variants:
        for table in TABLES:
            path = analysis_table(root, table)
            if path.is_file():
                tables[table] = [r for r in read_jsonl(path)
                                 if r["variant"] not in variants]
    return tables


def _analyze_seed(root: Path, vname: str, seed: int, cfg: ExperimentConfig, sets, what,
                  block: int, batch_size: int, tables: Tables, notes: list[str], bar) -> None:
    seed_dir = RunPaths(root).seed_dir(vname, seed)
    if not seed_dir.is_dir():
        notes.append(f"{vname} seed{seed}: not run (no {seed_dir.name} directory)")
        if needs_models(what):
            bar.update(len(cfg.stages))
        return
    key = {"variant": vname, "seed": seed}
    dirs = stage_dirs(cfg, seed_dir)
    if "retention" in what:
        tables["retention"] += collect_retention(dirs, key)
    if "graded" in what:
        tables["graded"] += collect_graded(cfg, dirs, key)
    if needs_models(what):
        model_based(cfg, sets, dirs, key, what, block, batch_size, tables, notes, bar)


def _write_results(root: Path, exp, tables: Tables, what, block: int, notes: list[str]
                   ) -> dict[str, Any]:
    for w in what:
        for table in INSTRUMENTS[w].tables:
            files.write_jsonl(analysis_table(root, table), tables.get(table, []))
    summary_path = analysis_summary(root)
    # aggregates of instruments not run this time stay as they were
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(summarize_tables(tables, what))
    summary.update(compare_layers.summarize(exp, tables, what))
    summary["notes"] = notes
    summary["block"] = block
    files.write_json(summary_path, summary)
    compare_layers.write_markdown(root, summary)
    for n in notes:
        log.warning("%s", n)
    return summary


def collect_retention(dirs, key) -> list[dict[str, Any]]:
    rows = []
    for _, _, d in dirs:
        if (d / RETENTION_FILE).is_file():
            rows += [{**key, **r} for r in read_jsonl(d / RETENTION_FILE)]
    return rows


def collect_graded(cfg: ExperimentConfig, dirs, key) -> list[dict[str, Any]]:
    rows = []
    for stage, _, d in dirs:
        for name in cfg.track:
            path = predictions_file(d, name)
            if path.is_file():
                rows += [{**key, "stage": stage, "set": name, "id": p["id"],
                          "correct": p["correct"], "token_acc": p["token_acc"],
                          "logprob": p["logprob"]}
                         for p in read_jsonl(path)]
    return rows


def _lens_rows(model, fmt, examples, batch_size: int, at: dict[str, Any], tables: Tables,
               notes: list[str]) -> None:
    layer_rows, fact_rows = logit_lens(model, fmt, examples, batch_size)
    tables["lens_layers"] += [{**at, **r} for r in layer_rows]
    tables["lens_facts"] += [{**at, **r} for r in fact_rows]


def _probe_rows(model, fmt, examples, batch_size: int, at: dict[str, Any], tables: Tables,
                notes: list[str]) -> None:
    rows, skipped = run_probes(model, fmt, examples, batch_size)
    tables["probes"] += [{**at, **r} for r in rows]
    if skipped:
        notes.append(f"probes: {skipped} facts of {at['set']} lack key/value or "
                     "subject/relation/object meta")


# instruments that read one checkpoint and one tracked set at a time (reversion compares two
# checkpoints: see model_based)
PER_SET: dict[str, Callable[..., None]] = {"lens": _lens_rows, "probes": _probe_rows}


def model_based(cfg: ExperimentConfig, sets, dirs, key, what, block: int, batch_size: int,
                tables: Tables, notes: list[str], bar) -> None:
    """Lens and probes on every stage checkpoint, reversion of each stage against the weights
    before it (the previous checkpoint, or the base model for the first stage)."""
    from factmem.models import Formatter, load_model, load_tokenizer

    fmt = Formatter.for_model(load_tokenizer(cfg.model), cfg.model)
    reversion = "reversion" in what
    prev_state = None  # weights before the current stage
    for stage, trained_set, d in dirs:
        if stage == BASE_STAGE:
            if reversion:
                prev_state = dict(load_model(cfg.model).state_dict())
            continue
        bar.set_description(f"analyze {key['variant']} seed{key['seed']} {stage}")
        ckpt = checkpoint_dir(d)
        if not (ckpt / "config.json").is_file():
            notes.append(f"{key['variant']} seed{key['seed']} {stage}: no checkpoint; run with "
                         "output.save_checkpoints: true for lens, reversion and probes")
            prev_state = None
            bar.update(1)
            continue
        log.debug("analyzing %s seed%d %s", key["variant"], key["seed"], stage)
        model = load_model(cfg.model, path=str(ckpt)).eval()
        at = {**key, "stage": stage}
        for name in cfg.track:
            for w, run in PER_SET.items():
                if w in what:
                    run(model, fmt, sets[name], batch_size, {**at, "set": name}, tables, notes)
        if reversion and trained_set in sets and prev_state is not None:
            rows = layer_reversion(model, prev_state, fmt, sets[trained_set], block, batch_size)
            tables["reversion"] += [{**at, "set": trained_set, **r} for r in rows]
        if reversion:
            prev_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        del model
        bar.update(1)


def _rounded_mean(xs) -> float | None:
    """Mean to 4 decimals for summary.json; None (JSON null) when there is nothing to average."""
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else None


def _lens_summary(tables: Tables) -> list[dict[str, Any]]:
    groups: dict[tuple, list] = defaultdict(list)
    for r in tables.get("lens_facts", []):
        groups[(r["variant"], r["seed"], r["stage"], r["set"])].append(r)
    # with several seeds, one more row per variant/stage/set pools the facts of all seeds
    # (seed "all"): the figure to compare variants by
    pooled: dict[tuple, list] = defaultdict(list)
    for (v, s, st, name) in groups:
        pooled[(v, st, name)].append(s)
    for (v, st, name), seeds in pooled.items():
        if len(seeds) > 1:
            groups[(v, "all", st, name)] = [r for s in seeds for r in groups[(v, s, st, name)]]
    return [
        {"variant": v, "seed": s, "stage": st, "set": name,
         **layer_diversity([r["first_layer"] for r in rows], rows[0]["n_layers"]),
         "first_token": layer_diversity([r["first_layer_first_token"] for r in rows],
                                        rows[0]["n_layers"])}
        for (v, s, st, name), rows in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1] == "all"))
    ]


def _probes_summary(tables: Tables) -> list[dict[str, Any]]:
    groups: dict[tuple, list] = defaultdict(list)
    for r in tables.get("probes", []):
        groups[(r["variant"], r["seed"], r["stage"], r["set"], r["probe"])].append(r)
    return [
        {"variant": v, "seed": s, "stage": st, "set": name, "probe": p, "n": len(rows),
         "accuracy": _rounded_mean(r["correct"] for r in rows),
         "token_acc": _rounded_mean(r["token_acc"] for r in rows),
         **({"choice_accuracy": _rounded_mean(r["choice_correct"] for r in rows)}
            if p == "choice" else {})}
        for (v, s, st, name, p), rows in groups.items()
    ]


def _reversion_summary(tables: Tables) -> list[dict[str, Any]]:
    groups: dict[tuple, list] = defaultdict(list)
    for r in tables.get("reversion", []):
        groups[(r["variant"], r["seed"], r["stage"], r["set"], r["group"],
                r["layer_start"], r["layer_end"])].append(r)
    return [
        {"variant": v, "seed": s, "stage": st, "set": name, "group": g, "layer_start": a,
         "layer_end": b, "accuracy": _rounded_mean(r["correct"] for r in rows),
         "token_acc": _rounded_mean(r["token_acc"] for r in rows)}
        for (v, s, st, name, g, a, b), rows in groups.items()
    ]


SUMMARIES: dict[str, Callable[[Tables], list[dict[str, Any]]]] = {
    "lens": _lens_summary, "probes": _probes_summary, "reversion": _reversion_summary}


def summarize_tables(tables: Tables, what) -> dict[str, Any]:
    return {w: summarize(tables) for w, summarize in SUMMARIES.items() if w in what}
