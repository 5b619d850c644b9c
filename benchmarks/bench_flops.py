"""Achieved training FLOP/s as a fraction of a measured matrix-multiply peak, same machine.

    python benchmarks/bench_flops.py           # embedded model, batch 8, 4 steps

Peak: the best of several float32 (float: the training dtype; bfloat16 on a GPU) square
matmuls of size 2048 through torch with the process's thread count; 2*n^3 FLOPs each.
Training FLOPs are counted analytically, the usual 6 x parameters x tokens (forward 2, backward
4 per parameter per token) split where factmem differs from a full forward:
  - 6 x N_body x T: every non-embedding parameter (attention, MLP, norms) on every real token T;
  - 6 x V x d x A: the unembedding (vocabulary V, width d) runs only at answer positions A
    (logits_to_keep), so it is counted on those only;
  - attention score FLOPs (sequence-length dependent) and the optimizer are left out: for
    sequences of ~30 tokens they are < 2% of the total.
Padding positions are computed but not counted (they are wasted work, not useful FLOPs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Timer, machine, machine_markdown, table, write_section  # noqa: E402


def matmul_peak(dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    import torch

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device == "cuda":
            torch.cuda.synchronize()
        with Timer() as t:
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
        best = min(best, t.seconds)
    return 2 * size**3 / best


def train_flops(model_name: str, steps: int, batch_size: int) -> dict:
    import torch
    from accelerate import Accelerator

    from factmem.config import ModelConfig, StopConfig, TrainConfig
    from factmem.data import build_source
    from factmem.data.synthetic import KVRParams
    from factmem.models import Formatter, load_model, load_tokenizer
    from factmem.train import train_stage

    cfg = ModelConfig(name=model_name)
    fmt = Formatter(load_tokenizer(cfg))
    facts = build_source("kvr", KVRParams(), steps * batch_size, 0, 0)
    torch.manual_seed(0)
    model = load_model(cfg)
    emb = model.get_input_embeddings().weight
    vocab, width = emb.shape
    total = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    body = total - emb.numel()
    if not model.config.tie_word_embeddings:
        body -= model.get_output_embeddings().weight.numel()
    encoded = [fmt.encode(f) for f in facts]
    answer_tokens = sum(sum(1 for x in e.labels if x != -100) for e in encoded)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    train = TrainConfig(lr=1e-4, batch_size=batch_size, warmup_fraction=0.0,
                        stop=StopConfig(rule="epochs", epochs=1))
    with Timer() as t:
        result = train_stage(acc.prepare(model), acc, fmt, facts, train, seed=0, progress=False)
    flops = 6 * body * result.tokens + 6 * vocab * width * answer_tokens
    return {"params": total, "body": body, "vocab": vocab, "width": width,
            "tokens": result.tokens, "answer_tokens": answer_tokens, "seconds": t.seconds,
            "flops": flops, "steps": result.steps,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded name or model directory")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    args = p.parse_args(argv)
    r = train_flops(args.model, args.steps, args.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, r["dtype"])
    peak = matmul_peak(dtype, device, args.matmul_size)
    achieved = r["flops"] / r["seconds"]
    rows = [[f"{r['params'] / 1e6:.1f}M ({r['body'] / 1e6:.1f}M body)", r["steps"], r["tokens"],
             r["answer_tokens"], f"{r['flops'] / 1e12:.3f}", f"{r['seconds']:.1f}",
             f"{achieved / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{achieved / peak:.1%}"]]
    body = "\n".join([
        f"## Training FLOP/s vs measured matmul peak ({Path(args.model).name}, batch "
        f"{args.batch_size}, {r['dtype']})", "",
        table(["parameters", "steps", "real tokens T", "answer tokens A", "training TFLOPs",
               "seconds", "achieved GFLOP/s", f"matmul peak GFLOP/s ({args.matmul_size}^2)",
               "fraction of peak"], rows), "",
        "FLOPs = 6 x N_body x T + 6 x V x d x A (see bench_flops.py: non-embedding parameters "
        "on every real token, the unembedding only at answer positions; attention scores, "
        "padding and the optimizer not counted). Seconds cover the whole stage call.",
        "", machine_markdown(machine()),
    ])
    print(body)
    write_section("flops", body, args.results)
    return {**r, "peak": peak, "achieved": achieved}


if __name__ == "__main__":
    main()
