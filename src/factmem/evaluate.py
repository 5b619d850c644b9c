"""Evaluation: greedy exact match (fast teacher-forced mode and `generate` reference mode),
per-example predictions, the accuracy matrix and forgetting.

Fast mode. Greedy decoding reproduces the gold answer iff at every answer position the argmax
of the logits is the gold token, the end-of-turn token included (greedy would then emit exactly
those tokens and stop). One teacher-forced forward pass decides it for a whole batch. Each alias
is checked the same way, so any alias counts. The same pass yields graded retention figures:
teacher-forced token accuracy and the gold answer's mean log-probability.

Fast and generate verdicts. Fast mode asks whether greedy decoding reproduces the gold answer's
OWN tokens; generate compares the decoded text after `strip().lower()`. Where the gold is
itself in normalised form (answers are stripped where examples are made) the two agree on every
answer the model was trained to reproduce (tests/test_evaluate.py, test_embedded_agreement.py).
What remains, and makes fast mode stricter: a model whose greedy output differs from the gold's
tokens but normalises to the same string (other letter case, extra whitespace or a newline
before end-of-turn, another tokenization of the same text) is wrong for fast and right for
generate. Score answers the model was not trained on verbatim with `eval.mode: generate`.

Generate mode decodes greedily under a neutral generation config (no repetition penalty, no
n-gram blocking, whatever the model's generation_config.json ships) and decodes the tokens
without `clean_up_tokenization_spaces` (which rewrites " 's" and " ." for Llama-3 tokenizers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from factmem.batch import answer_logits, answer_positions, length_sorted_batches, pad_batch
from factmem.data.examples import Example
from factmem.distributed import is_sharded
from factmem.models import Encoded, Formatter
from factmem.scoring import MatchKind, is_match, rouge_l

__all__ = ["Prediction", "evaluate_examples", "forgetting", "summarize"]


@dataclass
class Prediction:
    id: str
    prompt: str
    answers: list[str]
    prediction: str
    correct: bool
    token_acc: float  # teacher-forced, on the first answer (fast mode)
    logprob: float  # mean log-probability of the first answer's tokens (fast mode)
    answer_tokens: int  # tokens of the first answer (end-of-turn included)
    # where `prediction` comes from: "generate" (what greedy decoding printed), or
    # "teacher_forced_argmax" (fast mode: the argmax at each gold position, given the gold
    # prefix; equal to greedy's output when `correct`, not necessarily when wrong)
    predicted_by: str
    rouge_l: float | None = None  # task sets: ROUGE-L F1 of the generated text vs the target

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@torch.no_grad()
def teacher_forced(model, items: Sequence[Encoded], pad_id: int, batch_size: int):
    """Per item: (all argmax == gold, token accuracy, mean gold log-prob, argmax ids, answer
    token count)."""
    device = next(model.parameters()).device
    out: list[Any] = [None] * len(items)
    for batch in length_sorted_batches([len(e) for e in items], batch_size):
        ids, mask, _ = pad_batch([items[i] for i in batch], pad_id)
        first = min(items[i].prompt_len for i in batch) - 1
        logits, _ = answer_logits(model, ids.to(device), mask.to(device), first)
        logits = logits.float()
        for row, i in enumerate(batch):
            e = items[i]
            pos = torch.tensor(list(answer_positions(e)), device=device) - first
            gold = torch.tensor(e.input_ids[e.prompt_len :], device=device)
            step_logits = logits[row, pos]
            argmax = step_logits.argmax(-1)
            hits = argmax == gold
            logp = torch.log_softmax(step_logits, -1).gather(1, gold[:, None]).mean()
            out[i] = (bool(hits.all()), hits.float().mean().item(), logp.item(), argmax.tolist(),
                      len(gold))
    return out


@contextlib.contextmanager
def neutral_generation(model, fmt: Formatter) -> Iterator[Any]:
    """Greedy decoding as the definition of exact match: the model's own generation_config.json
    (a shipped repetition_penalty, no_repeat_ngram_size, bad words, forced tokens, ...) is set
    aside for the call. transformers fills every unset field of the config passed to `generate`
    from `model.generation_config`, so that one is replaced by a fresh config, then restored."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    neutral = GenerationConfig(
        do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=fmt.eos_id, pad_token_id=fmt.tok.pad_token_id,
        bos_token_id=fmt.tok.bos_token_id, use_cache=True,
    )
    model.generation_config = neutral
    try:
        yield neutral
    finally:
        if saved is not None:
            model.generation_config = saved


def decode_answer(fmt: Formatter, ids: Sequence[int]) -> str:
    """The text of answer tokens: special tokens dropped, no clean-up of spaces (which would
    turn a gold "it 's" into "it's")."""
    return fmt.tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@torch.no_grad()
def generate_answers(model, fmt: Formatter, items: Sequence[Encoded], batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy `generate` from each prompt (left-padded batches); the reference mode."""
    device = next(model.parameters()).device
    tok = fmt.tok
    prompts = [Encoded(e.id, e.input_ids[: e.prompt_len], [-100] * e.prompt_len, e.prompt_len)
               for e in items]
    texts: list[str] = [""] * len(items)
    with neutral_generation(model, fmt) as gen_cfg:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            ids, mask, _ = pad_batch([prompts[i] for i in batch], tok.pad_token_id, left=True)
            longest_gold = max(len(items[i]) - items[i].prompt_len for i in batch)
            gen_cfg.max_new_tokens = max(max_new_tokens, longest_gold + 1)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gen_cfg,
                                 synced_gpus=is_sharded(model))  # FSDP: ranks step together
            for row, i in enumerate(batch):
                texts[i] = decode_answer(fmt, out[row, ids.shape[1] :].tolist())
    return texts


def evaluate_examples(
    model, fmt: Formatter, examples: Sequence[Example], mode: str = "fast", batch_size: int = 32,
    max_new_tokens: int = 64, match: str | MatchKind = MatchKind.EXACT,
) -> list[Prediction]:
    """Score every example: exact match (any alias), plus graded figures on the first answer."""
    gen: list[int] = []
    was_training = model.training
    model.eval()
    try:
        primary = [fmt.encode(ex) for ex in examples]
        graded = teacher_forced(model, primary, fmt.tok.pad_token_id, batch_size)
        if mode == "fast":
            correct = [g[0] for g in graded]
            # aliases: one more teacher-forced check per extra answer, only where still wrong
            extra = [(i, a) for i, ex in enumerate(examples) if not correct[i]
                     for a in ex.answers[1:]]
            if extra:
                alias_items = [fmt.encode_answer(examples[i], a) for i, a in extra]
                for (i, _), r in zip(extra, teacher_forced(model, alias_items,
                                                           fmt.tok.pad_token_id, batch_size)):
                    correct[i] = correct[i] or r[0]
            texts = [_decode_until_eos(fmt, g[3]) for g in graded]
            # Sets scored on generated text (tasks; contains/number/boxed matches) cannot be
            # decided from argmax tokens: they are generated even in fast mode.
            gen = [i for i, ex in enumerate(examples) if needs_generation(ex, match)]
            if gen:
                for i, t in zip(gen, generate_answers(model, fmt, [primary[i] for i in gen],
                                                      batch_size, max_new_tokens)):
                    texts[i] = t
                    correct[i] = is_match(t, examples[i].answers, examples[i].match_kind(match))
        elif mode == "generate":
            texts = generate_answers(model, fmt, primary, batch_size, max_new_tokens)
            correct = [is_match(t, ex.answers, ex.match_kind(match))
                       for t, ex in zip(texts, examples)]
        else:
            raise ValueError(f"unknown eval mode {mode!r}")
    finally:
        model.train(was_training)
    generated = set(range(len(examples))) if mode == "generate" else set(gen)
    return [
        Prediction(ex.id, ex.prompt, list(ex.answers), text, bool(ok), round(g[1], 6),
                   round(g[2], 6), g[4],
                   "generate" if i in generated else "teacher_forced_argmax",
                   round(rouge_l(text, ex.target), 6) if ex.kind == "task" else None)
        for i, (ex, text, ok, g) in enumerate(zip(examples, texts, correct, graded))
    ]


def needs_generation(ex: Example, default_match: str | MatchKind = MatchKind.EXACT) -> bool:
    """True where exact token match cannot decide the verdict: task sets (ROUGE-L is scored on
    generated text) and examples matched by contains / number / boxed."""
    return ex.kind == "task" or ex.match_kind(default_match) is not MatchKind.EXACT


def _decode_until_eos(fmt: Formatter, ids: list[int]) -> str:
    if fmt.eos_id in ids:
        ids = ids[: ids.index(fmt.eos_id)]
    return decode_answer(fmt, ids)


def summarize(preds: Sequence[Prediction]) -> dict[str, float]:
    n = len(preds)
    out = {
        "accuracy": sum(p.correct for p in preds) / n,
        "token_acc": sum(p.token_acc for p in preds) / n,
        "logprob": sum(p.logprob for p in preds) / n,
        "n": n,
    }
    rouge = [p.rouge_l for p in preds if p.rouge_l is not None]
    if rouge:  # task sets: ROUGE-L and the teacher-forced loss, the mean NLL per gold token
        out["rouge_l"] = sum(rouge) / len(rouge)  # (long answers weigh more, as in training)
        tasks = [p for p in preds if p.rouge_l is not None]
        tokens = sum(p.answer_tokens for p in tasks)
        out["loss"] = -sum(p.logprob * p.answer_tokens for p in tasks) / tokens
    return out


def forgetting(matrix: dict[str, dict[str, float]], own_stage: dict[str, str]) -> dict[str, float]:
    """Per set: accuracy right after the stage that trained it minus accuracy at the end.

    `matrix[stage][set]` is accuracy; `own_stage[set]` names the (last) stage that trained it.
    Sets never trained have no forgetting entry."""
    final = list(matrix)[-1]
    return {s: matrix[st][s] - matrix[final][s] for s, st in own_stage.items() if st in matrix}
