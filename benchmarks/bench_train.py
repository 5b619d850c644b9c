"""Training throughput: factmem's stage loop vs `transformers.Trainer` with a standard collator.

    python benchmarks/bench_train.py           # embedded model, 64 KVR facts, batch 8, 8 steps

Same model, same facts (same tokenisation, loss on assistant tokens only), same batch size,
same number of optimizer steps, same learning rate and schedule. The Trainer side is what a
user would write: `DataCollatorForSeq2Seq(padding="longest")`, the default random sampler and
default optimizer, full-vocabulary logits at every position. Each side runs in its own fresh
process so that its peak memory (getrusage ru_maxrss: peak resident set size of the process,
model loading included) is its own. Throughput counts real (non-padding) tokens per second of
the training call; both sides see the same tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    Timer,
    machine,
    machine_markdown,
    peak_rss_mib,
    table,
    write_section,
)

LR = 1e-4


def facts_and_format(model_name: str, n: int):
    from factmem.config import ModelConfig
    from factmem.data import build_source
    from factmem.data.synthetic import KVRParams
    from factmem.models import Formatter, load_model, load_tokenizer

    cfg = ModelConfig(name=model_name)
    fmt = Formatter(load_tokenizer(cfg))
    facts = build_source("kvr", KVRParams(), n, 0, 0)
    return cfg, fmt, facts, load_model


def worker_factmem(model_name: str, steps: int, batch_size: int) -> dict:
    import torch
    from accelerate import Accelerator

    from factmem.config import StopConfig, TrainConfig
    from factmem.train import train_stage

    cfg, fmt, facts, load_model = facts_and_format(model_name, steps * batch_size)
    torch.manual_seed(0)
    model = load_model(cfg)
    rss_loaded = peak_rss_mib()
    acc = Accelerator(cpu=True)
    train = TrainConfig(lr=LR, batch_size=batch_size, warmup_fraction=0.0,
                        stop=StopConfig(rule="epochs", epochs=1))
    with Timer() as t:
        result = train_stage(acc.prepare(model), acc, fmt, facts, train, seed=0, progress=False)
    assert result.steps == steps
    return {"tokens": result.tokens, "seconds": t.seconds, "steps": result.steps,
            "padding_fraction": result.padding_fraction, "final_loss": result.final_loss,
            "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": rss_loaded,
            "optimizer": "adamw_torch_fused"}


def worker_trainer(model_name: str, steps: int, batch_size: int) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    cfg, fmt, facts, load_model = facts_and_format(model_name, steps * batch_size)
    torch.manual_seed(0)
    model = load_model(cfg)
    rss_loaded = peak_rss_mib()
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels}
            for e in (fmt.encode(f) for f in facts)]
    base = DataCollatorForSeq2Seq(fmt.tok, padding="longest", label_pad_token_id=-100)
    seen = {"real": 0, "padded": 0}

    def collate(features):  # counts what the standard collator hands the model
        batch = base(features)
        seen["real"] += int(batch["attention_mask"].sum())
        seen["padded"] += batch["attention_mask"].numel()
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
            learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=steps, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        with Timer() as t:
            out_metrics = trainer.train()
    return {"tokens": seen["real"], "seconds": t.seconds, "steps": out_metrics.global_step,
            "padding_fraction": 1 - seen["real"] / seen["padded"],
            "final_loss": out_metrics.training_loss, "peak_rss_mib": peak_rss_mib(),
            "rss_after_load_mib": rss_loaded,
            "optimizer": getattr(args.optim, "value", str(args.optim))}


WORKERS = {"factmem": worker_factmem, "trainer": worker_trainer}


def run_isolated(which: str, model: str, steps: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model", model, "--steps", str(steps),
           "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(res: dict[str, dict], model_name: str, steps: int, batch_size: int) -> str:
    rows = []
    for name, label in [("factmem", "factmem stage loop"),
                        ("trainer", "transformers.Trainer + DataCollatorForSeq2Seq")]:
        r = res[name]
        rows.append([label, r["steps"], r["tokens"], f"{r['seconds']:.1f}",
                     f"{r['tokens'] / r['seconds']:.0f}", f"{r['padding_fraction']:.1%}",
                     f"{r['peak_rss_mib']:.0f}",
                     f"{r['peak_rss_mib'] - r['rss_after_load_mib']:.0f}", r["optimizer"]])
    ratio = (res["factmem"]["tokens"] / res["factmem"]["seconds"]) / (
        res["trainer"]["tokens"] / res["trainer"]["seconds"])
    target = "met" if ratio >= 1.2 else "NOT met"
    return "\n".join([
        f"## Training throughput: factmem vs transformers.Trainer ({model_name}, "
        f"{steps * batch_size} KVR facts, batch {batch_size}, {steps} steps)", "",
        table(["trainer", "steps", "real tokens", "seconds", "tokens/s", "padding",
               "peak RSS MiB", "RSS growth in training MiB", "optimizer"], rows), "",
        f"factmem / Trainer throughput: {ratio:.2f}x (target >= 1.2x: {target}). Peak memory is "
        "getrusage ru_maxrss of a fresh process per side (model loading included); the growth "
        "column subtracts the peak after loading the model. Seconds cover the whole training "
        "call (setup, tokenisation on the factmem side, all steps).",
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded name or model directory")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.model, args.steps, args.batch_size)))
        return {}
    res = {w: run_isolated(w, args.model, args.steps, args.batch_size) for w in WORKERS}
    body = (report(res, Path(args.model).name, args.steps, args.batch_size) + "\n\n"
            + machine_markdown(machine()))
    print(body)
    write_section("train", body, args.results)
    return res


if __name__ == "__main__":
    main()
