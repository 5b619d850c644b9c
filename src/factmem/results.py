"""Results across variants and seeds: the table of tracked-set accuracy after each stage
(mean and SAMPLE standard deviation over seeds, n - 1 in the denominator, as reports use), as
JSON and markdown."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from factmem import files
from factmem.rundir import SUMMARY_FILE, SUMMARY_MD


def mean(xs: Iterable[float]) -> float:
    """The mean; NaN for no values (an empty cell of a figure or table)."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean (None for no values), SAMPLE standard deviation (n - 1; 0 for one value) and the
    values, as the results and comparison tables hold them."""
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,  # sample std (n - 1)
        "values": values,
    }


def summary_table(exp, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """results[variant][seed] = accuracy record -> {variant: {set: {stage: stats}}}."""
    table: dict[str, Any] = {}
    for variant, by_seed in results.items():
        records = list(by_seed.values())
        stages, sets = records[0]["stages"], records[0]["sets"]
        table[variant] = {
            s: {
                **{st: mean_std([r["accuracy"][st][s] for r in records]) for st in stages},
                **({"forgetting": mean_std([r["forgetting"][s] for r in records])}
                   if s in records[0]["forgetting"] else {}),
            }
            for s in sets
        }
    first = next(iter(results.values()))
    rec = next(iter(first.values()))
    return {
        "experiment": exp.name,
        "model": exp.first_variant.model.name,
        "seeds": {v: sorted(by_seed) for v, by_seed in results.items()},
        "stages": rec["stages"],
        "sets": rec["sets"],
        "table": table,
    }


def _cell(stats: dict[str, Any]) -> str:
    mean = 100 * stats["mean"]
    if len(stats["values"]) > 1:
        return f"{mean:.1f} ± {100 * stats['std']:.1f}"
    return f"{mean:.1f}"


def to_markdown(summary: dict[str, Any]) -> str:
    """One row per variant; per tracked set, accuracy (%) after each stage and the forgetting."""
    stages, sets = summary["stages"], summary["sets"]
    cols = []
    for s in sets:
        cols += [(s, st, f"{s} @{st}") for st in stages]
        if any("forgetting" in v[s] for v in summary["table"].values()):
            cols.append((s, "forgetting", f"{s} forgot"))
    header = "| variant | " + " | ".join(c[2] for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    rows = []
    for variant, by_set in summary["table"].items():
        cells = [_cell(by_set[s][st]) if st in by_set[s] else "" for s, st, _ in cols]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    seeds = sorted({x for v in summary["seeds"].values() for x in v})
    note = (f"Exact-match accuracy (%) of each tracked set before training (@base) and after each "
            f"stage; `forgot` = accuracy right after the set's own stage minus at the end. "
            f"Model {summary['model']}, seeds {seeds}"
            + (f" (mean ± sample standard deviation over the {len(seeds)} seeds)."
               if len(seeds) > 1 else "."))
    return "\n".join([header, sep, *rows, "", note]) + "\n"


def write_summary(root: Path, summary: dict[str, Any]) -> None:
    files.write_json(root / SUMMARY_FILE, summary)
    files.write_text(root / SUMMARY_MD, f"# {summary['experiment']}\n\n" + to_markdown(summary))
