"""Variants against their baseline: paired differences with 95% confidence intervals.

A config names a `baseline` variant (a variant may name its own, e.g. one baseline per stage-2
set). For every set trained before the last stage (what forgetting is measured on, e.g. D_A),
each variant is compared with its baseline after the last stage, fact by fact: exact match,
teacher-forced token accuracy and gold log-probability, read from the per-fact predictions.

Pairing and interval. Variant and baseline see the same facts under the same training seed, so
the unit is the paired difference d(seed, fact). The 95% interval is a hierarchical bootstrap:
resample the seeds with replacement, then within each drawn seed the facts with replacement,
and take the mean of d; 10,000 resamples, seeded (the table is reproducible). It carries both
sources of noise: which facts, and which training run. `mde` is the smallest true difference
the study would detect with 80% power at the 5% level, (1.96 + 0.84) x the bootstrap standard
error: a difference below it going undetected says little.

Premise. The setting needs every stage to end with its own set memorized (100% exact match,
factoid sets); a variant/seed where that fails is reported as such and not compared.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from factmem import files
from factmem.results import mean_std
from factmem.rundir import (
    COMPARISON_FILE,
    COMPARISON_MD,
    RunPaths,
    predictions_file,
    read_json,
    read_jsonl,
    stage_path,
)

METRICS = ("correct", "token_acc", "logprob")
RESAMPLES = 10_000
Z_POWER = 1.96 + 0.84  # two-sided 5% test, 80% power


def bootstrap(diffs: list[list[float]], resamples: int = RESAMPLES, seed: int = 0
              ) -> dict[str, float]:
    """diffs[s][f]: paired difference of seed s, fact f -> mean, 95% CI, standard error, mde."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(d, dtype=float) for d in diffs]
    n_seeds = len(arrays)
    picks = rng.integers(0, n_seeds, (resamples, n_seeds))  # the seeds each resample draws
    slot_means = np.empty((resamples, n_seeds))
    for j in range(n_seeds):  # vectorised over resamples: one draw of facts per (slot, seed)
        for s, a in enumerate(arrays):
            rows = np.flatnonzero(picks[:, j] == s)
            facts = rng.integers(0, len(a), (len(rows), len(a)))
            slot_means[rows, j] = a[facts].mean(axis=1)
    means = slot_means.mean(axis=1)
    se = float(means.std(ddof=1))
    return {"mean": float(np.mean([a.mean() for a in arrays])),
            "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5)),
            # no variation at all (every difference equal): no power figure to give
            "se": se, "mde": Z_POWER * se if se > 0 else None}


def _predictions(stage_dir: Path, name: str) -> dict[str, dict[str, Any]] | None:
    path = predictions_file(stage_dir, name)
    if not path.is_file():
        return None
    return {r["id"]: r for r in read_jsonl(path)}


def comparison(root: Path, exp) -> dict[str, Any] | None:
    """The comparison of every variant with its baseline, or None if the config names none."""
    pairs = {v: c.baseline for v, c in exp.variants.items() if c.baseline is not None}
    if not pairs:
        return None
    paths = RunPaths(root)
    rows = []
    for variant, base in pairs.items():
        cfg, bcfg = exp.variants[variant], exp.variants[base]
        last = len(cfg.stages) - 1
        compared = [s for st in cfg.stages[:-1] for s in (st.set, *st.joint) if s in cfg.track]
        for name in dict.fromkeys(compared):
            rows.append(_row(variant, base, name, cfg, bcfg, paths, last))
    return {"resamples": RESAMPLES, "interval": "hierarchical bootstrap over seeds and facts",
            "rows": rows}


def _row(variant, base, name, cfg, bcfg, paths, last) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant, "baseline": base, "set": name,
                           "stage": cfg.stages[last].name, "seeds": [], "not_memorized": {}}
    per_seed: dict[str, list[float]] = {m: [] for m in METRICS}
    diffs: dict[str, list[list[float]]] = {m: [] for m in METRICS}
    for seed in cfg.seeds:
        out, bout = paths.seed_dir(variant, seed), paths.seed_dir(base, seed)
        mine = _predictions(stage_path(out, cfg, last), name)
        theirs = _predictions(stage_path(bout, bcfg, last), name)
        if mine is None or theirs is None:
            continue  # not run (yet)
        row["seeds"].append(seed)
        failed = _failed_stages(cfg, out)
        if variant != base:  # a difference needs both sides to have memorized
            failed += [f"baseline {f}" for f in _failed_stages(bcfg, bout)]
        if failed:
            row["not_memorized"][str(seed)] = failed
        for m in METRICS:
            per_seed[m].append(statistics.fmean(float(p[m]) for p in mine.values()))
            diffs[m].append([float(mine[i][m]) - float(theirs[i][m]) for i in mine if i in theirs])
    for m in METRICS:
        row[m] = mean_std(per_seed[m])
        if variant != base and diffs[m] and not row["not_memorized"]:
            row[f"diff_{m}"] = bootstrap(diffs[m])
    return row


def _failed_stages(cfg, seed_dir: Path) -> list[str]:
    """Stages of this run whose own factoid set ended below 100% exact match."""
    failed = []
    for k, st in enumerate(cfg.stages):
        stage_dir = stage_path(seed_dir, cfg, k)
        for name in (st.set, *st.joint):
            preds = predictions_file(stage_dir, name)
            if not preds.is_file():
                continue
            rows = read_jsonl(preds)
            if any(r.get("rouge_l") is not None for r in rows):
                continue  # a task set: learned, not memorized
            acc = statistics.fmean(bool(r["correct"]) for r in rows)
            if acc < 1.0:
                failed.append(f"{st.name}: {name} {100 * acc:.1f}%")
    return failed


def _pm(stats: dict[str, Any], scale: float, digits: int) -> str:
    if stats["mean"] is None:
        return ""
    if len(stats["values"]) > 1:
        return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f}"


def _ci(d: dict[str, float] | None, scale: float, digits: int) -> str:
    if d is None:
        return ""
    return (f"{scale * d['mean']:+.{digits}f} [{scale * d['low']:+.{digits}f}, "
            f"{scale * d['high']:+.{digits}f}]")


def to_markdown(comp: dict[str, Any]) -> str:
    header = ("| variant | vs | set | exact match % | Δ exact match [95% CI] | token acc | "
              "Δ token acc [95% CI] | gold log-prob | Δ log-prob [95% CI] | MDE (exact match) |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in comp["rows"]:
        if r["not_memorized"]:
            note = "; ".join(f"seed {s}: {', '.join(v)}" for s, v in r["not_memorized"].items())
            diff = [f"not compared: not memorized ({note})", "", ""]
        else:
            diff = [_ci(r.get("diff_correct"), 100, 1), _ci(r.get("diff_token_acc"), 1, 3),
                    _ci(r.get("diff_logprob"), 1, 2)]
        mde = (r.get("diff_correct") or {}).get("mde")
        lines.append(" | ".join([
            f"| {r['variant']}", r["baseline"] if r["baseline"] != r["variant"] else "—",
            r["set"], _pm(r["correct"], 100, 1), diff[0], _pm(r["token_acc"], 1, 3), diff[1],
            _pm(r["logprob"], 1, 2), diff[2], f"{100 * mde:.1f}" if mde is not None else ""])
            + " |")
    seeds = sorted({s for r in comp["rows"] for s in r["seeds"]})
    note = (f"After the last stage ({comp['rows'][0]['stage'] if comp['rows'] else ''}): mean ± "
            f"sample std over seeds {seeds}; Δ = variant − baseline, paired by seed and fact, "
            f"95% CI by {comp['interval']} ({comp['resamples']:,} resamples); MDE = smallest "
            "difference in exact match (points) detectable with 80% power at the 5% level.")
    return "\n".join([*lines, "", note]) + "\n"


def write_comparison(root: Path, comp: dict[str, Any]) -> None:
    files.write_json(root / COMPARISON_FILE, comp)
    files.write_text(root / COMPARISON_MD, "# Variants against their baseline\n\n"
                  + to_markdown(comp))


def load_comparison(root: Path) -> dict[str, Any] | None:
    path = root / COMPARISON_FILE
    return read_json(path) if path.is_file() else None
