"""Where a variant stores facts, against its baseline. Claim (c) of the paper: under REMIX, do
facts become decodable in earlier layers, and are the layers that hold them more diverse?

From the tables `factmem analyze` writes (lens_facts, reversion), for every variant and what it
is compared with (`baseline`, `compare_with`: `compare.comparison_pairs`), every checkpoint both
have and every tracked set. Δ is always variant − baseline.

- Earlier? The first decodable layer, paired by seed and fact over the facts decodable on both
  sides; facts decodable on one side only, or on neither, are counted, not compared. Interval:
  `compare.paired_interval` (seeds x facts crossed when the same facts are compared in every
  seed, nested otherwise). Also as a fraction of depth (layer / n_layers), which stays
  comparable when the two sides' models differ in depth. Δ < 0: the variant decodes earlier.
- More diverse? Per seed and side, the spread of the compared facts' first layers (sample SD,
  entropy in bits of the layer histogram, distinct layers, as `layer_diversity`); the per-seed
  difference, its mean and a t interval over seeds (n − 1 df: paired_interval on one value per
  seed). One seed: the difference, no interval. Δ > 0: the variant's facts sit in more varied
  layers. The spread is over the same facts on both sides, so it says where those facts sit,
  not which facts survived (the per-side figures in summary.json's `lens` use each side's own
  decodable facts).
- Layer reversion: per reverted block, exact match and token accuracy after reverting, paired by
  seed and fact (Δ > 0: the variant keeps more with that block reverted). Per side and seed the
  largest single-block drop in exact match (trained − reverted) and its block; Δ of the drops
  with a t interval over seeds (Δ < 0: the variant relies less on any one block).

A pair that does not hold the same facts on both sides in a seed is "not compared", with counts.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factmem import files
from factmem.analysis.logit_lens import layer_diversity
from factmem.compare import comparison_pairs, format_ci, paired_interval
from factmem.results import mean_std
from factmem.rundir import ANALYSIS_DIR

LENS_KEY = "lens_comparison"
REVERSION_KEY = "reversion_comparison"
LAYERS_MD = "layers_comparison.md"
SPREADS = ("std", "entropy_bits", "distinct")
SIDES = ("variant", "baseline")
TRAINED = "none"  # the reversion group with nothing reverted (analysis/reversion.py)

Rows = list[dict[str, Any]]
Facts = dict[str, dict[str, Any]]  # fact id -> table row
BySeed = dict[int, Facts]


def summarize(exp, tables: dict[str, Rows], what: Sequence[str]) -> dict[str, Any]:
    """summary.json's comparison entries for the instruments in `what`; none if the config
    names no baseline."""
    pairs = [(v, b) for v, b in comparison_pairs(exp) if v != b]
    out: dict[str, Any] = {}
    if pairs and "lens" in what:
        out[LENS_KEY] = lens_comparison(exp, pairs, tables.get("lens_facts", []))
    if pairs and "reversion" in what:
        out[REVERSION_KEY] = reversion_comparison(exp, pairs, tables.get("reversion", []))
    return out


def layers_md(root: Path) -> Path:
    return root / ANALYSIS_DIR / LAYERS_MD


def write_markdown(root: Path, summary: dict[str, Any]) -> Path | None:
    """analysis/layers_comparison.md from summary.json's comparison entries (None: there are
    none, e.g. no baseline in the config)."""
    if summary.get(LENS_KEY) is None and summary.get(REVERSION_KEY) is None:
        return None
    path = layers_md(root)
    files.write_text(path, to_markdown(summary))
    return path


# --------------------------------------------------------------------------------------------
# Intervals (paired_interval's, see docs/method.md#what-the-intervals-cover)


def fact_interval(diffs: list[list[float]], crossed: bool,
                  bounds: tuple[float | None, float | None] = (None, None)) -> dict[str, Any]:
    """paired_interval over seeds and facts; one fact of one seed has no spread to measure."""
    if len(diffs) == 1 and len(diffs[0]) < 2:
        return {"mean": diffs[0][0], "low": None, "high": None, "mde": None, "seeds": 1,
                "facts": 1, "covers": "one fact of one seed"}
    return paired_interval(diffs, bounds, crossed)


def seed_interval(values: list[float], bounds: tuple[float | None, float | None] = (None, None)
                  ) -> dict[str, Any] | None:
    """Mean of one figure per seed and its t interval over seeds (n − 1 df): paired_interval on
    one value per seed, nested. One seed: the value, no interval."""
    if not values:
        return None
    if len(values) == 1:
        return {"mean": values[0], "low": None, "high": None, "mde": None, "seeds": 1,
                "covers": "one seed"}
    out = paired_interval([[v] for v in values], bounds, crossed=False)
    out.pop("facts")
    return {**out, "covers": "seeds"}


# --------------------------------------------------------------------------------------------
# Logit lens: earlier? more diverse?


def _index(rows: Rows, *extra: str) -> dict[tuple, BySeed]:
    """rows -> {(variant, stage, set, *extra): {seed: {fact id: row}}}."""
    out: dict[tuple, BySeed] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        out[(r["variant"], r["stage"], r["set"], *(r[k] for k in extra))][r["seed"]][r["id"]] = r
    return out


def lens_comparison(exp, pairs: list[tuple[str, str]], lens_facts: Rows) -> list[dict[str, Any]]:
    """One row per (variant, baseline, checkpoint, set) that both sides have in lens_facts."""
    idx = _index(lens_facts)
    rows = []
    for variant, base in pairs:
        cfg = exp.variants[variant]
        for stage in (st.name for st in cfg.stages):
            for name in cfg.track:
                mine, theirs = idx.get((variant, stage, name)), idx.get((base, stage, name))
                if mine and theirs and set(mine) & set(theirs):
                    rows.append(_lens_row(variant, base, stage, name, mine, theirs))
    return rows


def _head(variant: str, base: str, stage: str, name: str, mine: set[int], theirs: set[int]
          ) -> dict[str, Any]:
    """The pair's keys; seeds both sides have, and those only one side has (not run yet)."""
    return {"variant": variant, "baseline": base, "stage": stage, "set": name,
            "seeds": sorted(mine & theirs), "missing_seeds": sorted(mine ^ theirs),
            "facts_differ": {}}


def _same_facts(row: dict[str, Any], seed: int, a: Facts, b: Facts) -> bool:
    """A pair needs the same facts on both sides; a seed where they differ is recorded."""
    if set(a) == set(b):
        return True
    row["facts_differ"][str(seed)] = {"variant_only": len(set(a) - set(b)),
                                      "baseline_only": len(set(b) - set(a))}
    return False


def _lens_row(variant: str, base: str, stage: str, name: str, mine: BySeed, theirs: BySeed
              ) -> dict[str, Any]:
    row = {**_head(variant, base, stage, name, set(mine), set(theirs)), "facts": {},
           "compared": {}, "undecodable": {}}
    paired: dict[int, list[tuple[dict, dict]]] = {}  # seed -> facts decodable on both sides
    for s in row["seeds"]:
        a, b = mine[s], theirs[s]
        if not _same_facts(row, s, a, b):
            continue
        ok_a = {i for i, r in a.items() if r["first_layer"] is not None}
        ok_b = {i for i, r in b.items() if r["first_layer"] is not None}
        row["facts"][str(s)] = len(a)
        row["undecodable"][str(s)] = {"variant_only": len(ok_b - ok_a),
                                      "baseline_only": len(ok_a - ok_b),
                                      "both": len(set(a) - ok_a - ok_b)}
        paired[s] = [(a[i], b[i]) for i in sorted(ok_a & ok_b)]
        row["compared"][str(s)] = len(paired[s])
    # a seed with no fact decodable on both sides has no mean difference to contribute
    used = {s: p for s, p in paired.items() if p}
    row["seeds_used"] = list(used)
    if used and not row["facts_differ"]:
        row.update(_earlier(used))
        row["spread"] = _diverse(used)
    return row


def _earlier(used: dict[int, list[tuple[dict, dict]]]) -> dict[str, Any]:
    ids = [[a["id"] for a, _ in p] for p in used.values()]
    crossed = all(x == ids[0] for x in ids)  # the same facts compared in every seed
    depth = max(r["n_layers"] for p in used.values() for pair in p for r in pair)
    layer = [[a["first_layer"] - b["first_layer"] for a, b in p] for p in used.values()]
    frac = [[a["first_layer"] / a["n_layers"] - b["first_layer"] / b["n_layers"] for a, b in p]
            for p in used.values()]
    return {"crossed": crossed,
            "n_layers": {side: next(iter(used.values()))[0][k]["n_layers"]
                         for k, side in enumerate(SIDES)},
            "first_layer": {side: mean_std([statistics.fmean(pair[k]["first_layer"]
                                                             for pair in p)
                                            for p in used.values()])
                            for k, side in enumerate(SIDES)},
            "diff_first_layer": fact_interval(layer, crossed, (-depth, depth)),
            "diff_depth": fact_interval(frac, crossed, (-1.0, 1.0))}


def _diverse(used: dict[int, list[tuple[dict, dict]]]) -> dict[str, Any]:
    """Per statistic: each side's value per seed (over the compared facts) and the per-seed
    difference's mean and t interval over seeds."""
    div = {side: [layer_diversity([pair[k]["first_layer"] for pair in p], p[0][k]["n_layers"])
                  for p in used.values()]
           for k, side in enumerate(SIDES)}
    out = {}
    for stat in SPREADS:
        per_side = {side: [d[stat] for d in div[side]] for side in SIDES}
        # the SD of one fact is undefined (None): that seed has no difference
        diffs = [x - y for x, y in zip(*per_side.values()) if x is not None and y is not None]
        out[stat] = {**per_side, "diff": seed_interval(diffs)}
    return out


# --------------------------------------------------------------------------------------------
# Layer reversion


def reversion_comparison(exp, pairs: list[tuple[str, str]], reversion: Rows
                         ) -> list[dict[str, Any]]:
    """One row per (variant, baseline, stage, the stage's own set) that both sides have."""
    idx = _index(reversion, "group")
    groups: dict[tuple, dict[str, None]] = defaultdict(dict)  # blocks in the table's order
    for r in reversion:
        groups[(r["variant"], r["stage"], r["set"])][r["group"]] = None
    rows = []
    for variant, base in pairs:
        for st in exp.variants[variant].stages:
            mine = {g: idx[(variant, st.name, st.set, g)]
                    for g in groups.get((variant, st.name, st.set), {})}
            theirs = {g: idx[(base, st.name, st.set, g)]
                      for g in groups.get((base, st.name, st.set), {})}
            if mine and theirs:
                rows.append(_reversion_row(variant, base, st.name, st.set, mine, theirs))
    return rows


def _reversion_row(variant: str, base: str, stage: str, name: str,
                   mine: dict[str, BySeed], theirs: dict[str, BySeed]) -> dict[str, Any]:
    seeds = [{s for by_seed in side.values() for s in by_seed} for side in (mine, theirs)]
    row = {**_head(variant, base, stage, name, *seeds), "blocks": [], "blocks_differ": {}}
    if set(mine) != set(theirs):  # e.g. one side analyzed again with another --block
        row["blocks_differ"] = {"variant_only": [g for g in mine if g not in theirs],
                                "baseline_only": [g for g in theirs if g not in mine]}
        row["largest_drop"] = {"variant": [], "baseline": [], "diff": None}
        return row
    for g in mine:
        a = {s: mine[g].get(s, {}) for s in row["seeds"]}
        b = {s: theirs[g].get(s, {}) for s in row["seeds"]}
        same = [_same_facts(row, s, a[s], b[s]) for s in row["seeds"]]  # records every seed
        if all(same) and any(a.values()):
            row["blocks"].append(_block(g, a, b))
    if row["facts_differ"]:
        row["blocks"] = []  # not compared: the counts say why
    row["largest_drop"] = _largest_drops(mine, theirs, row["seeds"])
    return row


def _accuracy(facts: Facts, metric: str = "correct") -> float:
    return statistics.fmean(float(r[metric]) for r in facts.values())


def _block(group: str, a: BySeed, b: BySeed) -> dict[str, Any]:
    seeds = [s for s in a if a[s]]
    ids = [sorted(a[s]) for s in seeds]
    crossed = all(x == ids[0] for x in ids)
    first = next(iter(a[seeds[0]].values()))
    out: dict[str, Any] = {"group": group, "layer_start": first["layer_start"],
                           "layer_end": first["layer_end"], "facts": len(ids[0]),
                           "accuracy": {"variant": mean_std([_accuracy(a[s]) for s in seeds]),
                                        "baseline": mean_std([_accuracy(b[s]) for s in seeds])}}
    for m in ("correct", "token_acc"):
        diffs = [[float(a[s][i][m]) - float(b[s][i][m]) for i in i_s]
                 for s, i_s in zip(seeds, ids)]
        out[f"diff_{m}"] = fact_interval(diffs, crossed, (-1.0, 1.0))
    return out


def _largest_drops(mine: dict[str, BySeed], theirs: dict[str, BySeed], seeds: list[int]
                   ) -> dict[str, Any]:
    """Per side and seed: the single block whose reversion costs most exact match (trained −
    reverted; ties: the lowest block) and that drop; Δ of the drops, t interval over seeds."""
    out: dict[str, Any] = {}
    for side, by_group in zip(SIDES, (mine, theirs)):
        out[side] = [d for d in (_drop(by_group, s) for s in seeds) if d is not None]
    both = {d["seed"] for d in out["variant"]} & {d["seed"] for d in out["baseline"]}
    drops = [{d["seed"]: d["drop"] for d in out[side] if d["seed"] in both} for side in SIDES]
    out["diff"] = seed_interval([drops[0][s] - drops[1][s] for s in sorted(both)], (-1.0, 1.0))
    return out


def _drop(by_group: dict[str, BySeed], seed: int) -> dict[str, Any] | None:
    trained = by_group.get(TRAINED, {}).get(seed)
    singles = [(g, facts[seed]) for g, facts in by_group.items()
               if facts.get(seed) and next(iter(facts[seed].values()))["layer_start"] > 0]
    if not trained or not singles:
        return None
    acc = _accuracy(trained)
    drop, group = max(((acc - _accuracy(f), g) for g, f in singles), key=lambda x: x[0])
    return {"seed": seed, "drop": drop, "block": group}


# --------------------------------------------------------------------------------------------
# Tables (layers_comparison.md and the report)

LENS_HEADERS = [
    "variant", "vs", "checkpoint", "set", "seeds", "facts compared (all seeds)",
    "not decodable: variant only / baseline only / both", "first layer: variant / baseline",
    "Δ first layer [95% CI] (< 0: variant earlier)",
    "Δ sample SD of first layer [95% CI] (> 0: variant more spread)",
    "Δ entropy, bits [95% CI] (> 0: variant more spread)",
    "Δ distinct layers [95% CI] (> 0: variant more spread)"]
LENS_NOTE = (
    "Logit lens, first decodable layer (from it on every answer token is top-1 through the last "
    "layer). Δ = variant − baseline at the same checkpoint, over the facts decodable on both "
    "sides; the others are counted, not compared. Δ first layer: paired by seed and fact, "
    "95% CI as in comparison.md (t interval on per-seed means widened by the facts' spread; "
    "docs/method.md#what-the-intervals-cover). Δ SD, entropy and distinct layers: the spread "
    "of the compared facts' first layers per seed and side, Δ per seed, mean and t interval "
    "over seeds (n − 1 df); one seed has no interval. One seed: the Δ first layer interval "
    "covers only which facts were sampled, not another training run.")
REVERSION_HEADERS = [
    "variant", "vs", "stage", "set", "reverted block", "seeds", "facts",
    "exact match % after reverting: variant / baseline",
    "Δ exact match, points [95% CI] (> 0: variant keeps more)",
    "Δ token acc [95% CI] (> 0: variant keeps more)"]
DROP_HEADERS = [
    "variant", "vs", "stage", "set", "largest single-block drop, points: variant (block per seed)",
    "baseline (block per seed)", "Δ largest drop [95% CI] (< 0: variant relies less on one block)"]
REVERSION_NOTE = (
    "Layer reversion: one block of layers of the stage's checkpoint put back to its weights "
    "before the stage, the stage's own set evaluated again (block `none`: nothing reverted, "
    "`all`: the pre-stage model). Δ = variant − baseline, paired by seed and fact, 95% CI as "
    "in comparison.md. Largest drop: exact match trained − with the most harmful single block "
    "reverted, per seed; Δ per seed, mean and t interval over seeds (n − 1 df).")


def _not_compared(r: dict[str, Any]) -> str | None:
    if r.get("blocks_differ"):
        d = r["blocks_differ"]
        return (f"not compared: other reverted blocks (variant only: "
                f"{', '.join(d['variant_only']) or '-'}; baseline only: "
                f"{', '.join(d['baseline_only']) or '-'}); run factmem analyze --what "
                "reversion with one --block for both")
    if r["facts_differ"]:
        return "not compared: other facts (" + "; ".join(
            f"seed {s}: {c['variant_only']} only in the variant, {c['baseline_only']} only in "
            "the baseline" for s, c in r["facts_differ"].items()) + ")"
    return None


def _pair(r: dict[str, Any]) -> list[str]:
    return [r["variant"], r["baseline"], r["stage"], r["set"]]


def _seeds(r: dict[str, Any], used: list[int]) -> str:
    """How many seeds the figures cover, and the seeds only one side has (not run yet)."""
    missing = r["missing_seeds"]
    return f"{len(used)}" + (f" (one side only: {', '.join(map(str, missing))})"
                             if missing else "")


def _both(stats: dict[str, dict[str, Any]], scale: float = 1.0, digits: int = 2) -> str:
    return " / ".join("-" if stats[s]["mean"] is None else f"{scale * stats[s]['mean']:.{digits}f}"
                      for s in SIDES)


def lens_table(rows: Rows) -> list[list[str]]:
    out = []
    for r in rows:
        und = [sum(u[k] for u in r["undecodable"].values())
               for k in ("variant_only", "baseline_only", "both")]
        head = [*_pair(r), _seeds(r, r["seeds_used"]),
                f"{sum(r['compared'].values())}/{sum(r['facts'].values())}",
                " / ".join(map(str, und))]
        why = _not_compared(r) or (None if "spread" in r else
                                   "not compared: no fact decodable on both sides")
        if why:
            out.append([*head, "", why, "", "", ""])
            continue
        sp = r["spread"]
        out.append([*head, _both(r["first_layer"]), format_ci(r["diff_first_layer"], 1, 2),
                    format_ci(sp["std"]["diff"], 1, 2),
                    format_ci(sp["entropy_bits"]["diff"], 1, 2),
                    format_ci(sp["distinct"]["diff"], 1, 1)])
    return out


def reversion_table(rows: Rows) -> list[list[str]]:
    out = []
    for r in rows:
        why = _not_compared(r)
        if why:
            out.append([*_pair(r), "", _seeds(r, r["seeds"]), "", "", why, ""])
        out += [[*_pair(r), b["group"], _seeds(r, r["seeds"]), str(b["facts"]),
                 _both(b["accuracy"], 100, 1), format_ci(b["diff_correct"], 100, 1),
                 format_ci(b["diff_token_acc"], 1, 3)] for b in r["blocks"]]
    return out


def drop_table(rows: Rows) -> list[list[str]]:
    def side(drops: list[dict[str, Any]]) -> str:
        if not drops:
            return "-"
        mean = 100 * statistics.fmean(d["drop"] for d in drops)
        return f"{mean:.1f} ({', '.join(d['block'] for d in drops)})"

    return [[*_pair(r), side(r["largest_drop"]["variant"]), side(r["largest_drop"]["baseline"]),
             _not_compared(r) or format_ci(r["largest_drop"]["diff"], 100, 1)] for r in rows]


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(row) + " |" for row in rows)]


def to_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Where facts are stored: variants against their baseline", ""]
    if summary.get(LENS_KEY) is not None:
        lines += ["## Logit lens: earlier? more diverse?", "", LENS_NOTE, "",
                  *_md_table(LENS_HEADERS, lens_table(summary[LENS_KEY])), ""]
    if summary.get(REVERSION_KEY) is not None:
        rev = summary[REVERSION_KEY]
        lines += ["## Layer reversion", "", REVERSION_NOTE, "",
                  *_md_table(REVERSION_HEADERS, reversion_table(rev)), "",
                  *_md_table(DROP_HEADERS, drop_table(rev)), ""]
    return "\n".join(lines)
