"""Exact-match evaluation: fast (one teacher-forced pass) vs `generate`, same facts, same model.

    python benchmarks/bench_eval.py            # 500 KVR facts on the embedded model

Half of the facts are made "known": their gold answer is replaced by the model's own greedy
output (from the timed `generate` pass, kept only where generation ended with end-of-turn), so
the verdicts to agree on are a mix of right and wrong, not all-wrong on an untrained model.
`generate` output depends only on the prompt, so its verdicts on the mixed set come from the
same pass. Fast mode is then timed on the mixed set and the verdicts compared fact by fact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Timer, machine, machine_markdown, table, write_section  # noqa: E402


def run(model_name: str, n: int, batch_size: int, max_new_tokens: int) -> dict:
    import torch

    from factmem.config import ModelConfig
    from factmem.data import Example, build_source
    from factmem.data.synthetic import KVRParams
    from factmem.evaluate import evaluate_examples, teacher_forced
    from factmem.models import Formatter, load_model, load_tokenizer
    from factmem.scoring import is_match

    cfg = ModelConfig(name=model_name)
    fmt = Formatter(load_tokenizer(cfg))
    model = load_model(cfg).eval()
    torch.manual_seed(0)
    facts = build_source("kvr", KVRParams(), n, 0, 0)
    with Timer() as t_gen:
        gen = evaluate_examples(model, fmt, facts, mode="generate", batch_size=batch_size,
                                max_new_tokens=max_new_tokens)
    mixed, gen_verdicts = [], []
    for i, (ex, p) in enumerate(zip(facts, gen)):
        text = p.prediction
        ended = len(fmt.tok(text, add_special_tokens=False)["input_ids"]) < max_new_tokens - 1
        if i % 2 == 0 and text.strip() and ended:
            ex = Example.qa(ex.id, ex.prompt, text)
        mixed.append(ex)
        gen_verdicts.append(is_match(text, ex.answers))
    with Timer() as t_fast:
        fast = evaluate_examples(model, fmt, mixed, mode="fast", batch_size=batch_size)
    fast_verdicts = [p.correct for p in fast]
    # Stronger than the verdicts: generation's first token must be the teacher-forced argmax
    # at the first answer position (same prompt, same logits).
    encoded = [fmt.encode(e) for e in mixed]
    tf = teacher_forced(model, encoded, fmt.tok.pad_token_id, batch_size)
    first_gen = [fmt.tok(p.prediction + fmt.tok.eos_token, add_special_tokens=False)["input_ids"][0]
                 for p in gen]
    first_ok = sum(a[3][0] == b for a, b in zip(tf, first_gen))
    return {
        "n": n, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "generate_s": t_gen.seconds, "fast_s": t_fast.seconds,
        "speedup": t_gen.seconds / t_fast.seconds,
        "known": sum(gen_verdicts), "fast_correct": sum(fast_verdicts),
        "agree": sum(a == b for a, b in zip(gen_verdicts, fast_verdicts)),
        "first_token_agree": first_ok,
        "disagreements": [ex.id for ex, a, b in zip(mixed, gen_verdicts, fast_verdicts) if a != b],
    }


def report(r: dict, model_name: str) -> str:
    rows = [
        ["generate (reference)", r["n"], f"{r['generate_s']:.1f}",
         f"{r['n'] / r['generate_s']:.1f}", r["known"]],
        ["fast (teacher-forced)", r["n"], f"{r['fast_s']:.1f}", f"{r['n'] / r['fast_s']:.1f}",
         r["fast_correct"]],
    ]
    target = "met" if r["speedup"] >= 10 and r["agree"] == r["n"] else "NOT met"
    return "\n".join([
        f"## Exact-match evaluation: fast vs generate ({model_name}, {r['n']} KVR facts)", "",
        table(["mode", "facts", "seconds", "facts/s", "correct"], rows), "",
        f"Speed-up {r['speedup']:.1f}x; same verdict on {r['agree']}/{r['n']} facts "
        f"({r['known']} correct under generate); generation's first token equals the "
        f"teacher-forced argmax on {r['first_token_agree']}/{r['n']}. Target (>= 10x, same "
        f"verdicts): {target}. Batch size {r['batch_size']}, generate max_new_tokens "
        f"{r['max_new_tokens']} (stops at end-of-turn)."
        + (f" Disagreeing ids: {', '.join(r['disagreements'][:10])}."
           if r["disagreements"] else ""),
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="embedded name or model directory")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    args = p.parse_args(argv)
    r = run(args.model, args.n, args.batch_size, args.max_new_tokens)
    body = report(r, Path(args.model).name) + "\n\n" + machine_markdown(machine())
    print(body)
    write_section("eval", body, args.results)
    return r


if __name__ == "__main__":
    main()
