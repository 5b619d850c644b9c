"""Variants against their baseline: paired differences with 95% confidence intervals.

A config names a `baseline` variant (a variant may name its own, e.g. one baseline per stage-2
set, and further ones in `compare_with`). For every set trained before the last stage (what
forgetting is measured on, e.g. D_A), each variant is compared with its baseline after the last
stage, fact by fact: exact match, teacher-forced token accuracy and gold log-probability, read
from the per-fact predictions.

Pairing. Variant and baseline see the same facts under the same training seed, so the unit is
the paired difference d(seed, fact). A comparison needs the same facts on both sides in every
seed; a seed where they differ makes the row "not compared" (never silently dropped facts).

Interval. The question is whether the variant keeps more facts *of this kind* under *another
training run*, so the interval must carry both sources of noise. The facts of a set are the same
in every seed (sets are built once per run), so seeds and facts are crossed:
    d(s, f) = mu + a_s + b_f + e_sf     (seed, fact and interaction effects)
and the mean over n seeds and F facts has variance s2_a/n + s2_b/F + s2_e/(nF). From the
two-way ANOVA mean squares (MS_seed = F var(seed means), MS_fact = n var(fact means), MS_res):
    seed part  SE_s^2 = MS_seed/(nF) = var(per-seed mean differences)/n   (s2_a/n + s2_e/(nF))
    fact part  SE_f^2 = max(0, MS_fact - MS_res)/(nF)                     (s2_b/F)
and the 95% interval is mean ± sqrt((t_{n-1} SE_s)^2 + (t_{F-1} SE_f)^2): the t interval on
per-seed means, widened by the facts' own spread, each part with its own degrees of freedom.
With 3 seeds t_2 = 4.30: the price of three training runs. In simulation (tests/
test_compare.py, docs/method.md) its coverage is 0.95-0.97 at 3-5 seeds; the percentile
bootstrap over seeds and facts used before gave 0.91 at 3 seeds and 0.89 at 5 (resampling n
seeds shrinks their variance by (n - 1)/n, and percentiles ignore how few seeds there are), and
a single Satterthwaite t 0.93 (its degrees of freedom grow when the seed part is
underestimated by chance).
Sets that differ between seeds (nested design): the t interval on per-seed means alone.
One seed: a t interval over facts, which covers only which facts were sampled, not another
training run (the table note says so, and no MDE is given). Bounded figures (exact match,
token accuracy) are clipped to their possible range, [-1, 1].

`mde` is the smallest true difference the study would detect with 80% power at the 5% level:
the same combination with t_0.975 + t_0.80 in place of t_0.975.

Premise. The setting needs every stage to end with its own set memorized (100% exact match,
factoid sets); a variant/seed where that fails is reported as such and not compared.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

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
BOUNDS = {"correct": (-1.0, 1.0), "token_acc": (-1.0, 1.0), "logprob": (None, None)}
LEVEL = 0.95
POWER = 0.80
INTERVAL = ("t interval on per-seed means widened by the spread of facts (crossed seeds x "
            "facts; docs/method.md)")


def paired_interval(diffs: list[list[float]], bounds: tuple[float | None, float | None]
                    = (None, None), crossed: bool = True) -> dict[str, Any]:
    """diffs[s][f]: paired difference of seed s, fact f (crossed: fact f is the same fact in
    every seed) -> mean, 95% interval (low, high), standard error and its seed and fact parts,
    mde, and what the interval covers ("seeds and facts" or "facts only")."""
    arrays = [np.asarray(d, dtype=float) for d in diffs]
    n = len(arrays)
    mean = float(np.mean([a.mean() for a in arrays]))
    if n == 1:  # facts only: a t interval over the one run's facts
        d = arrays[0]
        parts = [(float(d.var(ddof=1)) / len(d) if len(d) > 1 else 0.0, len(d) - 1)]
    elif crossed and len({len(a) for a in arrays}) == 1 and len(arrays[0]) > 1:
        parts = _crossed_parts(np.stack(arrays))
    else:  # nested: other facts in every seed; each seed mean carries its facts' noise
        seed_means = np.array([a.mean() for a in arrays])
        parts = [(float(seed_means.var(ddof=1)) / n, n - 1)]
    parts = [(v, df) for v, df in parts if v > 0]
    out: dict[str, Any] = {"mean": mean, "low": mean, "high": mean,
                           "se": float(np.sqrt(sum(v for v, _ in parts))), "mde": None,
                           "parts": [{"var": v, "df": df} for v, df in parts], "seeds": n,
                           "facts": int(max(len(a) for a in arrays)),
                           "covers": "facts only" if n == 1 else "seeds and facts"}
    if parts:
        half = _combined(parts, lambda df: float(stats.t.ppf(0.5 + LEVEL / 2, df)))
        lo, hi = bounds
        out["low"], out["high"] = _clip(mean - half, lo, hi), _clip(mean + half, lo, hi)
        if n > 1:  # one run says nothing about another: no power figure from one seed
            out["mde"] = _combined(parts, lambda df: float(stats.t.ppf(0.5 + LEVEL / 2, df)
                                                           + stats.t.ppf(POWER, df)))
    return out


def _combined(parts: list[tuple[float, float]], quantile) -> float:
    """sqrt(sum (q(df_i) SE_i)^2): each variance part scaled by its own t quantile."""
    return float(np.sqrt(sum(quantile(df) ** 2 * v for v, df in parts)))


def _clip(x: float, lo: float | None, hi: float | None) -> float:
    return float(min(max(x, lo if lo is not None else x), hi if hi is not None else x))


def _crossed_parts(d: np.ndarray) -> list[tuple[float, float]]:
    """d [seeds, facts] -> [(seed-part variance, n-1 df), (fact-part variance, F-1 df)] of the
    grand mean. E[MS_seed] = F s2_a + s2_e and E[MS_fact] - E[MS_res] = n s2_b, so
    MS_seed/(nF) + (MS_fact - MS_res)/(nF) = s2_a/n + s2_e/(nF) + s2_b/F. The seed part is
    never truncated (with 3 seeds MS_seed falls below MS_res by chance); a negative fact part
    is taken as 0."""
    n, f = d.shape
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_seed, ms_fact = f * rows.var(ddof=1), n * cols.var(ddof=1)
    ms_res = ((d - rows[:, None] - cols[None, :] + d.mean()) ** 2).sum() / ((n - 1) * (f - 1))
    return [(float(ms_seed) / (n * f), n - 1), (max(0.0, float(ms_fact - ms_res)) / (n * f),
                                                f - 1)]


def _predictions(stage_dir: Path, name: str) -> dict[str, dict[str, Any]] | None:
    path = predictions_file(stage_dir, name)
    if not path.is_file():
        return None
    return {r["id"]: r for r in read_jsonl(path)}


def comparison_pairs(exp) -> list[tuple[str, str]]:
    """(variant, what it is compared with) for every variant's baseline and `compare_with`
    entries, in config order; a baseline's pair with itself included (its own table row)."""
    return [(v, b) for v, c in exp.variants.items()
            for b in dict.fromkeys([*([c.baseline] if c.baseline else []),
                                    *(o for o in c.compare_with if o != v)])]


def comparison(root: Path, exp) -> dict[str, Any] | None:
    """The comparison of every variant with its baseline, or None if the config names none."""
    pairs = comparison_pairs(exp)
    if not pairs:
        return None
    paths = RunPaths(root)
    rows = []
    for variant, base in pairs:
        cfg, bcfg = exp.variants[variant], exp.variants[base]
        last = len(cfg.stages) - 1
        compared = [s for st in cfg.stages[:-1] for s in (st.set, *st.joint) if s in cfg.track]
        for name in dict.fromkeys(compared):
            rows.append(_row(variant, base, name, cfg, bcfg, paths, last))
    return {"interval": INTERVAL, "level": LEVEL, "rows": rows}


def _row(variant, base, name, cfg, bcfg, paths, last) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant, "baseline": base, "set": name,
                           "stage": cfg.stages[last].name, "seeds": [], "not_memorized": {},
                           "facts_differ": {}}
    per_seed: dict[str, list[float]] = {m: [] for m in METRICS}
    diffs: dict[str, list[list[float]]] = {m: [] for m in METRICS}
    fact_ids: list[list[str]] = []
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
        if set(mine) != set(theirs):  # a pair needs the same facts on both sides
            row["facts_differ"][str(seed)] = {"variant_only": len(set(mine) - set(theirs)),
                                              "baseline_only": len(set(theirs) - set(mine))}
        ids = sorted(mine)
        fact_ids.append(ids)
        for m in METRICS:
            per_seed[m].append(statistics.fmean(float(p[m]) for p in mine.values()))
            diffs[m].append([float(mine[i][m]) - float(theirs[i][m]) for i in ids
                             if i in theirs])
    crossed = all(ids == fact_ids[0] for ids in fact_ids)  # the same facts in every seed
    for m in METRICS:
        row[m] = mean_std(per_seed[m])
        if (variant != base and diffs[m] and not row["not_memorized"]
                and not row["facts_differ"]):
            row[f"diff_{m}"] = paired_interval(diffs[m], BOUNDS[m], crossed)
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


def format_ci(d: dict[str, Any] | None, scale: float, digits: int) -> str:
    """'+mean [low, high]' of an interval dict; '+mean (no interval: why)' where it has none."""
    if d is None:
        return ""
    if d.get("low") is None:
        return f"{scale * d['mean']:+.{digits}f} (no interval: {d['covers']})"
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
        elif r.get("facts_differ"):
            note = "; ".join(f"seed {s}: {c['variant_only']} only in the variant, "
                             f"{c['baseline_only']} only in the baseline"
                             for s, c in r["facts_differ"].items())
            diff = [f"not compared: other facts ({note})", "", ""]
        else:
            diff = [format_ci(r.get("diff_correct"), 100, 1),
                    format_ci(r.get("diff_token_acc"), 1, 3),
                    format_ci(r.get("diff_logprob"), 1, 2)]
        mde = (r.get("diff_correct") or {}).get("mde")
        lines.append(" | ".join([
            f"| {r['variant']}", r["baseline"] if r["baseline"] != r["variant"] else "—",
            r["set"], _pm(r["correct"], 100, 1), diff[0], _pm(r["token_acc"], 1, 3), diff[1],
            _pm(r["logprob"], 1, 2), diff[2], f"{100 * mde:.1f}" if mde is not None else ""])
            + " |")
    seeds = sorted({s for r in comp["rows"] for s in r["seeds"]})
    note = (f"After the last stage ({comp['rows'][0]['stage'] if comp['rows'] else ''}): mean ± "
            f"sample std over seeds {seeds}; Δ = variant − baseline, paired by seed and fact, "
            f"95% CI: {comp['interval']}; MDE = smallest difference in exact match (points) "
            "detectable with 80% power at the 5% level.")
    single = list(dict.fromkeys(r["variant"] for r in comp["rows"]
                                if (r.get("diff_correct") or {}).get("covers") == "facts only"))
    if single:
        note += (f" One seed ({', '.join(single)}): the interval covers only which facts were "
                 "sampled, not another training run, and no MDE is given.")
    return "\n".join([*lines, "", note]) + "\n"


def write_comparison(root: Path, comp: dict[str, Any]) -> None:
    files.write_json(root / COMPARISON_FILE, comp)
    files.write_text(root / COMPARISON_MD, "# Variants against their baseline\n\n"
                  + to_markdown(comp))


def load_comparison(root: Path) -> dict[str, Any] | None:
    path = root / COMPARISON_FILE
    return read_json(path) if path.is_file() else None
