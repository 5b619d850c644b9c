"""The "why" table of claim (a) in docs/results.md, from a forgetting-by-db run directory:
stage-2 loss and gradient norm (train_log.jsonl), kvr_a log-prob and exact match during stage 2
(retention.jsonl), means over seeds 0-2.

    python docs/study-forgetting-by-db/why.py runs/forgetting-by-db
"""

import json
import sys
from collections import defaultdict
from statistics import mean

VARIANTS = ["kvr-b", "place-of-death", "capitals", "gsm8k-steps", "gsm8k-tokens", "web-steps",
            "web-tokens"]
SEEDS = [0, 1, 2]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def seed_figures(stage_dir):
    log = read_jsonl(f"{stage_dir}/train_log.jsonl")
    by_step = defaultdict(list)  # kvr_a's facts at each retention evaluation
    for r in read_jsonl(f"{stage_dir}/retention.jsonl"):
        if r["set"] == "kvr_a":
            by_step[r["step"]].append(r)
    steps = sorted(by_step)
    lp = {k: mean(r["logprob"] for r in by_step[k]) for k in steps}
    em = {k: mean(r["correct"] for r in by_step[k]) for k in steps}
    lowest = min(steps, key=lambda k: lp[k])
    return {"steps": len(log), "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
            "grad_norm": mean(r["grad_norm"] for r in log), "lp_start": lp[steps[0]],
            "lp_lowest": lp[lowest], "lowest_at": lowest, "lp_end": lp[steps[-1]],
            "em_lowest": min(em.values()), "em_end": em[steps[-1]]}


def main(run):
    print("| D_B | stage-2 steps | D_B loss, first step -> last | grad norm, mean over stage "
          "| kvr_a gold log-prob: start / lowest (step) / end | kvr_a exact match: lowest / end |")
    print("|---|---:|---|---:|---|---|")
    for v in VARIANTS:
        f = [seed_figures(f"{run}/{v}/seed{s}/02-stage2") for s in SEEDS]

        def m(key, f=f):
            return mean(x[key] for x in f)

        at = ",".join(str(x["lowest_at"]) for x in f)
        print(f"| {v} | {f[0]['steps']} | {m('loss_first'):.2f} -> {m('loss_last'):.3f} "
              f"| {m('grad_norm'):.2f} | {m('lp_start'):.3f} / {m('lp_lowest'):.2f} ({at}) / "
              f"{m('lp_end'):.2f} | {100 * m('em_lowest'):.1f} / {100 * m('em_end'):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
