"""The stage-2 -> stage-3 table of docs/results.md, from a three-stages run directory: each
figure per seed after stage 2 and after stage 3 (accuracy.json), and the mean change with a t
interval over the seeds (n - 1 degrees of freedom).

    .venv/bin/python docs/study-three-stages/stage2_to_stage3.py runs/three-stages
"""

import json
import sys
from pathlib import Path
from statistics import mean, stdev

from scipy import stats

SEEDS = [0, 1, 2]
SETS = [("kvr_a", 32), ("kvr_b", 16)]  # tracked set, facts in it
FIGURES = [("accuracy", "facts kept", True, "{:.0f}"), ("token_acc", "token acc", False, "{:.3f}"),
           ("logprob", "gold log-prob", False, "{:.2f}")]


def main(run):
    print("| variant | set | figure | after stage 2, per seed | after stage 3, per seed | change "
          "stage 2 -> 3, mean [95% t interval over seeds, 2 df] |")
    print("|---|---|---|---|---|---|")
    records = {v: [json.loads(Path(f"{run}/{v}/seed{s}/accuracy.json").read_text())
                   for s in SEEDS] for v in ("naive", "remix")}
    t = stats.t.ppf(0.975, len(SEEDS) - 1)
    for v, recs in records.items():
        for name, n in SETS:
            for key, label, as_count, fmt in FIGURES:
                scale = n if as_count else 1
                before = [r[key]["stage2"][name] * scale for r in recs]
                after = [r[key]["stage3"][name] * scale for r in recs]
                change = [b - a for a, b in zip(before, after)]
                d, half = mean(change), t * stdev(change) / len(change) ** 0.5
                print(f"| {v} | {name} | {label} | {', '.join(map(fmt.format, before))} | "
                      f"{', '.join(map(fmt.format, after))} | {d:+.2f} [{d - half:+.2f}, "
                      f"{d + half:+.2f}] |")


if __name__ == "__main__":
    main(sys.argv[1])
