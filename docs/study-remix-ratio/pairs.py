"""Paired differences between two variants of one run directory, by factmem's own interval
(factmem.compare.paired_interval: paired by seed and fact, a t interval on per-seed means
widened by the spread of facts), for the figures `factmem report` compares with the baseline:
exact match, token accuracy, gold log-prob of one set after the last stage. `factmem report`
compares each variant with its baseline only; this compares any two (e.g. ratio 4 with ratio 1).

    .venv/bin/python docs/study-remix-ratio/pairs.py runs/remix-ratio kvr_a remix-r4:remix-r1 ...
"""

import sys

from factmem import load_run
from factmem.compare import BOUNDS, paired_interval

FIGURES = [("correct", "Δ exact match (points)", 100, "{:+.1f}"),
           ("token_acc", "Δ token acc", 1, "{:+.3f}"), ("logprob", "Δ log-prob", 1, "{:+.2f}")]


def main(run: str, set_name: str, pairs: list[str]) -> None:
    res = load_run(run)
    preds = res.predictions
    last = list(dict.fromkeys(preds["stage"]))[-1]
    rows = preds[(preds["stage"] == last) & (preds["set"] == set_name)]
    heads = " | ".join(f"{label} [95% CI]" for _, label, _, _ in FIGURES)
    print(f"| variant | vs | set | {heads} |")
    print("|---|---|---|" + "---:|" * len(FIGURES))
    for pair in pairs:
        a, b = pair.split(":")
        cells = []
        for key, _, scale, fmt in FIGURES:
            diffs = []
            for seed in sorted(set(rows["seed"])):
                mine = rows[(rows["variant"] == a) & (rows["seed"] == seed)].set_index("id")[key]
                theirs = rows[(rows["variant"] == b) & (rows["seed"] == seed)].set_index("id")[key]
                if len(mine) == 0 or len(theirs) == 0:
                    raise SystemExit(f"{run}: no {set_name} predictions of {a} or {b}, seed {seed}")
                if set(mine.index) != set(theirs.index):
                    raise SystemExit(f"{run}: {a} and {b} scored different facts, seed {seed}")
                ids = sorted(mine.index)
                diffs.append([float(mine[i]) - float(theirs[i]) for i in ids])
            d = paired_interval(diffs, BOUNDS[key])
            cells.append(f"{fmt.format(d['mean'] * scale)} [{fmt.format(d['low'] * scale)}, "
                         f"{fmt.format(d['high'] * scale)}]")
        print(f"| {a} | {b} | {set_name} | {' | '.join(cells)} |")
    print(f"\nAfter {last}; paired by seed and fact over seeds {sorted(set(rows['seed']))}, "
          "95% CI by factmem.compare.paired_interval (as `factmem report`).")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
