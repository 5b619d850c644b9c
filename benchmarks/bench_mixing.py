"""Training throughput on REMIX stages: length-grouped vs mixed+padded vs mixed+packed batches.

    python benchmarks/bench_mixing.py          # embedded model, 32 KVR facts, ratio 2, batch 8
    python benchmarks/bench_mixing.py --repeats 3   # each layout 3 times, median seconds

Two stages of the paper's best REMIX recipe at the reference scripts' ratio 2: stage 1 mixes
random word passages into KVR facts, stage 2 mixes generic text (the built-in corpus, 50 + 50
words) into other KVR facts. Each layout trains each stage for two epochs from the same weights,
in this one process, one after the other: same items, same steps, only the batching differs.
- length_grouped: facts and passages in separate batches, padded to the batch's longest
  (factmem's old default; it changes what mixing does, see train/batching.py)
- mixed + padded: every batch carries the mixture, each item padded to the micro-batch's longest
- mixed + packed: every batch carries the mixture, one row per micro-batch, no padding
Throughput counts real tokens (padding excluded) per second of the whole `train_stage` call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Timer, machine, machine_markdown, table, write_section  # noqa: E402

LAYOUTS = {  # name -> (train.batching, train.packing)
    "length_grouped (padded)": ("length_grouped", False),
    "mixed + padded": ("mixed", False),
    "mixed + packed": ("mixed", True),
}


def stage_examples(n_facts: int, ratio: float, stage: int, key_length: int = 8):
    from factmem.data import build_source
    from factmem.data.generic import GenericParams
    from factmem.data.synthetic import KVRParams, RandomWordsParams

    facts = build_source("kvr", KVRParams(key_length=key_length), n_facts, 2000 * stage, 0)
    k = round(ratio * n_facts)
    if stage == 0:
        mix = build_source("random-words", RandomWordsParams(), k, 0, 0)
    else:
        mix = build_source("generic", GenericParams(), k, 0, 0)
    return facts + mix, [0] * len(facts) + [1] * len(mix)


def run(model_name: str, n_facts: int, ratio: float, batch_size: int, epochs: int,
        repeats: int = 1) -> dict:
    import torch
    from accelerate import Accelerator

    from factmem.config import ModelConfig, StopConfig, TrainConfig
    from factmem.models import Formatter, load_model, load_tokenizer
    from factmem.train import train_stage

    cfg = ModelConfig(name=model_name)
    fmt = Formatter(load_tokenizer(cfg))
    out: dict = {}
    for stage, label in ((0, "stage 1: KVR + random words"), (1, "stage 2: KVR + generic text")):
        examples, groups = stage_examples(n_facts, ratio, stage)
        names = list(LAYOUTS)
        for rep in range(repeats):
            # each repeat starts the rotation one layout later, so no layout always runs first
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                batching, packing = LAYOUTS[name]
                torch.manual_seed(0)
                model = load_model(cfg)
                acc = Accelerator(cpu=not torch.cuda.is_available())
                train = TrainConfig(lr=1e-4, batch_size=batch_size, batching=batching,
                                    packing=packing,
                                    stop=StopConfig(rule="epochs", epochs=epochs))
                with Timer() as t:
                    result = train_stage(acc.prepare(model), acc, fmt, examples, train, seed=0,
                                         progress=False, groups=groups)
                r = out.setdefault((label, name), {
                    "tokens": result.tokens, "steps": result.steps, "times": [],
                    "padding": result.padding_fraction, "layout": result.layout,
                    "items": len(examples)})
                r["times"].append(t.seconds)
                r["seconds"] = statistics.median(r["times"])
                del model, acc
    # layouts in the table's order, whatever order the last repeat ran them in
    return {(label, name): out[(label, name)] for label, name in
            sorted(out, key=lambda k: (k[0], names.index(k[1])))}


def report(res: dict, model_name: str, n_facts: int, ratio: float, batch_size: int) -> str:
    rows, speed = [], {}
    repeats = min(len(r["times"]) for r in res.values())
    for (stage, name), r in res.items():
        tps = r["tokens"] / r["seconds"]
        speed[(stage, name)] = tps
        times = r["times"]
        spread = f" ({min(times):.1f}-{max(times):.1f})" if len(times) > 1 else ""
        rows.append([stage, name, r["items"], r["steps"], r["tokens"], f"{r['padding']:.1%}",
                     f"{r['seconds']:.1f}{spread}", f"{tps:.0f}"])
    stages = list(dict.fromkeys(s for s, _ in res))
    ratios = []
    for s in stages:
        x = speed[(s, "mixed + packed")] / speed[(s, "length_grouped (padded)")]
        ratios.append(f"{s}: {x:.2f}x")
    met = all(speed[(s, "mixed + packed")] >= speed[(s, "length_grouped (padded)")]
              for s in stages)
    return "\n".join([
        f"## REMIX stages: length-grouped vs mixed batches ({model_name}, {n_facts} KVR facts, "
        f"ratio {ratio:g}, batch {batch_size})", "",
        table(["stage", "batches", "items", "steps", "real tokens", "padding", "seconds",
               "tokens/s"], rows), "",
        f"mixed + packed / length_grouped throughput: {'; '.join(ratios)} (target >= 1x: "
        f"{'met' if met else 'NOT met'}). Same items and steps per stage; one process, layouts "
        "run one after the other from the same initial weights"
        + (f", {repeats} times in rotated order; seconds are the median (range in brackets)"
           if repeats > 1 else "")
        + ". Padding is the share of computed positions that were padding.",
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded name or model directory")
    p.add_argument("--facts", type=int, default=32)
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="time each layout this many times, in rotated order; report the median")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    args = p.parse_args(argv)
    res = run(args.model, args.facts, args.ratio, args.batch_size, args.epochs, args.repeats)
    body = (report(res, Path(args.model).name, args.facts, args.ratio, args.batch_size)
            + "\n\n" + machine_markdown(machine()))
    print(body)
    write_section("mixing", body, args.results)
    return res


if __name__ == "__main__":
    main()
