"""`factmem analyze RUN_DIR`: every instrument over every variant, seed and stage of a run.

Reads the run directory as `factmem run` wrote it (config.yaml, VARIANT/seedS/NN-STAGE/) and
writes tidy tables under RUN_DIR/analysis/, one JSONL row per (variant, seed, stage, set, ...):
    retention.jsonl     per step and fact during training (needs eval.retention_every)
    graded.jsonl        per stage and fact: exact match, token accuracy, gold log-prob
    lens_layers.jsonl   per checkpoint, set, fact and layer: gold rank/prob, top-1
    lens_facts.jsonl    per checkpoint, set and fact: first decodable layer
    reversion.jsonl     per stage (its own set), reverted layer group and fact
    probes.jsonl        per checkpoint, set, probe and fact
    summary.json        aggregates: lens layer diversity, probe and reversion accuracy
Model-based instruments (lens, reversion, probes) need the stage checkpoints
(`output.save_checkpoints: true`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from factmem import io
from factmem.analysis.logit_lens import layer_diversity, logit_lens
from factmem.analysis.probes import run_probes
from factmem.analysis.reversion import layer_reversion
from factmem.config import ExperimentConfig, load_experiment
from factmem.errors import FactmemError
from factmem.train.retention import RETENTION_FILE

log = logging.getLogger(__name__)

WHAT = ("retention", "graded", "lens", "reversion", "probes")
MODEL_BASED = ("lens", "reversion", "probes")
BASE_DIR = "00-base"
TABLES = ("retention", "graded", "lens_layers", "lens_facts", "reversion", "probes")


def parse_what(text: str | None) -> list[str]:
    if not text or text == "all":
        return list(WHAT)
    what = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in what if w not in WHAT]
    if bad:
        raise FactmemError(f"--what: unknown analysis {bad[0]!r}; choose from {', '.join(WHAT)}")
    return what


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_dirs(cfg: ExperimentConfig, seed_dir: Path) -> list[tuple[str, str | None, Path]]:
    """[(stage name, set it trains, directory)] starting with the base evaluation."""
    from factmem.experiment import safe_name

    out: list[tuple[str, str | None, Path]] = [("base", None, seed_dir / BASE_DIR)]
    for k, st in enumerate(cfg.stages):
        out.append((st.name, st.set, seed_dir / f"{k + 1:02d}-{safe_name(st.name)}"))
    return out


def open_run(run_dir: str | Path) -> tuple[Path, Any]:
    """(root, Experiment) of a run directory, for the instruments that read it (the public
    `factmem.load_run` returns its results as tables instead)."""
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise FactmemError(f"{root}: not a run directory (no config.yaml); "
                           "give the directory `factmem run` printed")
    return root, load_experiment(root / "config.yaml")


def analyze(run_dir: str | Path, what: Sequence[str] = WHAT, block: int = 1,
            batch_size: int | None = None, variants: Sequence[str] = (),
            progress: bool = True) -> dict[str, Any]:
    """Run the instruments in `what`, write the tables, return summary.json's content.

    `variants` limits the work to those variants; rows of other variants already in the tables
    are kept (analyze variants as they finish, or redo one)."""
    from factmem.experiment import RunPaths, SetCache

    if block < 1:
        raise FactmemError("--block: must be >= 1")
    root, exp = open_run(run_dir)
    unknown = [v for v in variants if v not in exp.variants]
    if unknown:
        raise FactmemError(f"--variant: {unknown[0]!r} is not a variant of this run "
                           f"({', '.join(exp.variants)})")
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if variants:
        for table in TABLES:
            path = root / "analysis" / f"{table}.jsonl"
            if path.is_file():
                tables[table] = [r for r in read_jsonl(path) if r["variant"] not in variants]
    notes: list[str] = []
    cache = SetCache()
    todo = [v for v in exp.variants if not variants or v in variants]
    # one bar step per stage checkpoint (the model-based instruments are the slow part)
    bar = tqdm(total=sum(len(exp.variants[v].seeds) * len(exp.variants[v].stages) for v in todo)
               if any(w in what for w in MODEL_BASED) else 0,
               desc="analyze", unit="checkpoint", disable=not progress, dynamic_ncols=True)
    for vname, cfg in exp.variants.items():
        if variants and vname not in variants:
            continue
        sets = cache.sets(cfg)
        for seed in cfg.seeds:
            seed_dir = RunPaths(root).seed_dir(vname, seed)
            if not seed_dir.is_dir():
                notes.append(f"{vname} seed{seed}: not run (no {seed_dir.name} directory)")
                if any(w in what for w in MODEL_BASED):
                    bar.update(len(cfg.stages))
                continue
            key = {"variant": vname, "seed": seed}
            dirs = stage_dirs(cfg, seed_dir)
            if "retention" in what:
                tables["retention"] += collect_retention(dirs, key)
            if "graded" in what:
                tables["graded"] += collect_graded(cfg, dirs, key)
            if any(w in what for w in MODEL_BASED):
                model_based(cfg, sets, dirs, key, what, block, batch_size or cfg.eval.batch_size,
                            tables, notes, bar)
    bar.close()
    out = root / "analysis"
    names = {"lens": ("lens_layers", "lens_facts")}
    for w in what:
        for table in names.get(w, (w,)):
            io.write_jsonl(out / f"{table}.jsonl", tables.get(table, []))
    old_path = out / "summary.json"
    # aggregates of instruments not run this time stay as they were
    summary = json.loads(old_path.read_text()) if old_path.is_file() else {}
    summary.update(summarize_tables(tables, what))
    summary["notes"] = notes
    summary["block"] = block
    io.write_json(out / "summary.json", summary)
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
            path = d / "predictions" / f"{name}.jsonl"
            if path.is_file():
                rows += [{**key, "stage": stage, "set": name, "id": p["id"], "correct": p["correct"],
                          "token_acc": p["token_acc"], "logprob": p["logprob"]}
                         for p in read_jsonl(path)]
    return rows


def model_based(cfg: ExperimentConfig, sets, dirs, key, what, block: int, batch_size: int,
                tables: dict[str, list[dict[str, Any]]], notes: list[str], bar) -> None:
    """Lens and probes on every stage checkpoint, reversion of each stage against the weights
    before it (the previous checkpoint, or the base model for the first stage)."""
    from factmem.models import Formatter, load_model, load_tokenizer

    tok = load_tokenizer(cfg.model)
    fmt = Formatter.for_model(tok, cfg.model)
    prev_state = None  # weights before the current stage
    for i, (stage, trained_set, d) in enumerate(dirs):
        ckpt = d / "checkpoint"
        if stage == "base":
            if "reversion" in what:
                prev_state = {n: t for n, t in load_model(cfg.model).state_dict().items()}
            continue
        bar.set_description(f"analyze {key['variant']} seed{key['seed']} {stage}")
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
            examples = sets[name]
            if "lens" in what:
                layer_rows, fact_rows = logit_lens(model, fmt, examples, batch_size)
                tables["lens_layers"] += [{**at, "set": name, **r} for r in layer_rows]
                tables["lens_facts"] += [{**at, "set": name, **r} for r in fact_rows]
            if "probes" in what:
                rows, skipped = run_probes(model, fmt, examples, batch_size)
                tables["probes"] += [{**at, "set": name, **r} for r in rows]
                if skipped:
                    notes.append(f"probes: {skipped} facts of {name} lack key/value or "
                                 "subject/relation/object meta")
        if "reversion" in what and trained_set in sets and prev_state is not None:
            rows = layer_reversion(model, prev_state, fmt, sets[trained_set], block, batch_size)
            tables["reversion"] += [{**at, "set": trained_set, **r} for r in rows]
        if "reversion" in what:
            prev_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        del model
        bar.update(1)


def _mean(xs) -> float | None:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize_tables(tables, what) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "lens" in what:
        groups: dict[tuple, list] = defaultdict(list)
        for r in tables.get("lens_facts", []):
            groups[(r["variant"], r["seed"], r["stage"], r["set"])].append(r)
        # with several seeds, one more row per variant/stage/set pools the facts of all seeds
        # (seed "all"): the figure to compare variants by
        pooled: dict[tuple, list] = defaultdict(list)
        for (v, s, st, name), rows in groups.items():
            pooled[(v, st, name)].append(s)
        for (v, st, name), seeds in pooled.items():
            if len(seeds) > 1:
                groups[(v, "all", st, name)] = [r for s in seeds for r in groups[(v, s, st, name)]]
        out["lens"] = [
            {"variant": v, "seed": s, "stage": st, "set": name,
             **layer_diversity([r["first_layer"] for r in rows], rows[0]["n_layers"]),
             "first_token": layer_diversity([r["first_layer_first_token"] for r in rows],
                                            rows[0]["n_layers"])}
            for (v, s, st, name), rows in sorted(
                groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1] == "all"))
        ]
    if "probes" in what:
        groups = defaultdict(list)
        for r in tables.get("probes", []):
            groups[(r["variant"], r["seed"], r["stage"], r["set"], r["probe"])].append(r)
        out["probes"] = [
            {"variant": v, "seed": s, "stage": st, "set": name, "probe": p, "n": len(rows),
             "accuracy": _mean(r["correct"] for r in rows),
             "token_acc": _mean(r["token_acc"] for r in rows),
             **({"choice_accuracy": _mean(r["choice_correct"] for r in rows)}
                if p == "choice" else {})}
            for (v, s, st, name, p), rows in groups.items()
        ]
    if "reversion" in what:
        groups = defaultdict(list)
        for r in tables.get("reversion", []):
            groups[(r["variant"], r["seed"], r["stage"], r["set"], r["group"],
                    r["layer_start"], r["layer_end"])].append(r)
        out["reversion"] = [
            {"variant": v, "seed": s, "stage": st, "set": name, "group": g, "layer_start": a,
             "layer_end": b, "accuracy": _mean(r["correct"] for r in rows),
             "token_acc": _mean(r["token_acc"] for r in rows)}
            for (v, s, st, name, g, a, b), rows in groups.items()
        ]
    return out
