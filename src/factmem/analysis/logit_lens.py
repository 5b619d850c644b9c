"""Logit lens: decode each layer's residual stream through the final norm and the unembedding
at the answer positions (teacher forced) and ask from which layer on the answer is top-1.

Layer 0 is the embedding output (the input to the first block), layer L the output of block L.
Block outputs are taken with forward hooks on the decoder layers, before the final norm, so the
last layer's lens is exactly the model's own logits (`output_hidden_states` would not do: some
models report the last hidden state after the final norm). Hooks are removed on exit.

Per fact and layer: the first answer token's gold rank and probability, the mean gold
probability over answer tokens, top-1 for the first token and for every answer token.
Per fact: `first_layer`, the first layer from which the whole answer stays top-1 through the
last layer (None when the last layer itself misses it). The end-of-turn token is not part of
the answer here: it says when to stop, not what the fact is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from factmem.analysis.layers import final_norm, output_logits, unembedding
from factmem.batch import pad_batch
from factmem.data.examples import Example
from factmem.errors import ModelError
from factmem.models import Encoded, Formatter, decoder_layers


@contextmanager
def capture_residuals(model):
    """Yields a list that each forward fills with [embedding output, block 1 output, ...]
    ([B, T, H] each); every hook is removed when the block exits, also on error."""
    _, layers = decoder_layers(model)
    states: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        states.clear()
        states.append(args[0] if args else kwargs["hidden_states"])

    def hook(_module, _args, output):
        states.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def lens_logits(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """Per layer 0..N the lens logits at `positions` ([L+1, B, P, V]) and the model's own
    logits there ([B, P, V]). Raises ModelError when the last layer's lens is not the model's
    logits: the parts found are not the ones the model applies."""
    logits_of = output_logits(model)  # before the hooks: looking the parts up may run the model
    with capture_residuals(model) as states:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, positions].float()
        per_layer = torch.stack([logits_of(h[:, positions]) for h in states]).float()
    check_last_layer(model, per_layer[-1], logits)
    return per_layer, logits


def check_last_layer(model, lens: torch.Tensor, logits: torch.Tensor) -> None:
    """The lens at the last layer must reproduce the model's logits: to float rounding (a few
    units in the last place of the weights' dtype, relative to the largest logit)."""
    dtype = next(model.parameters()).dtype
    tol = max(1e-5, 4 * torch.finfo(dtype).eps) * (float(logits.abs().max()) or 1.0)
    worst = float((lens - logits).abs().max())
    if worst > tol:
        raise ModelError(
            f"{type(model).__name__}: the logit lens at the last layer is not the model's own "
            f"logits (off by {worst:.3g}, allowed {tol:.3g}): the final norm "
            f"({type(final_norm(model)).__name__}) or unembedding "
            f"({type(unembedding(model)).__name__}) found is not what the model applies, or it "
            "transforms its logits in a way factmem does not know; the lens would misread it")


def answer_token_positions(e: Encoded, eos_id: int | None) -> tuple[list[int], list[int]]:
    """(positions whose logits predict the answer tokens, those tokens), end-of-turn excluded."""
    gold = e.input_ids[e.prompt_len :]
    if len(gold) > 1 and gold[-1] == eos_id:
        gold = gold[:-1]
    return list(range(e.prompt_len - 1, e.prompt_len - 1 + len(gold))), gold


@torch.no_grad()
def logit_lens(model, fmt: Formatter, examples: Sequence[Example], batch_size: int = 16
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows per fact and layer, rows per fact with `first_layer`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items = [fmt.encode(ex) for ex in examples]
    layer_rows: list[dict[str, Any]] = []
    fact_rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            ids, mask, _ = pad_batch(batch, fmt.tok.pad_token_id)
            spans = [answer_token_positions(e, fmt.eos_id) for e in batch]
            first = min(p[0] for p, _ in spans)
            last = max(p[-1] for p, _ in spans)
            positions = torch.arange(first, last + 1, device=device)
            lens, _ = lens_logits(model, ids.to(device), mask.to(device), positions)
            for row, (e, (pos, gold)) in enumerate(zip(batch, spans)):
                idx = torch.tensor(pos, device=device) - first
                rows = fact_layers(lens[:, row, idx], torch.tensor(gold, device=device))
                for layer, r in enumerate(rows):
                    layer_rows.append({"id": e.id, "layer": layer, **r})
                fact_rows.append({"id": e.id, "n_layers": len(rows) - 1,
                                  "first_layer": first_stable_layer([r["top1_all"] for r in rows]),
                                  "first_layer_first_token": first_stable_layer(
                                      [r["top1_first"] for r in rows])})
    finally:
        model.train(was_training)
    return layer_rows, fact_rows


def fact_layers(logits: torch.Tensor, gold: torch.Tensor) -> list[dict[str, Any]]:
    """logits [L+1, A, V] at a fact's A answer positions, gold [A] -> one dict per layer."""
    probs = torch.softmax(logits, -1)
    gold_logit = logits.gather(-1, gold.expand(logits.shape[0], -1)[..., None])  # [L+1, A, 1]
    ranks = (logits > gold_logit).sum(-1)  # [L+1, A]: how many tokens beat the gold one
    gold_prob = probs.gather(-1, gold.expand(logits.shape[0], -1)[..., None])[..., 0]
    return [
        {"rank_first": int(ranks[layer, 0]), "prob_first": round(float(gold_prob[layer, 0]), 6),
         "mean_prob": round(float(gold_prob[layer].mean()), 6),
         "top1_first": bool(ranks[layer, 0] == 0), "top1_all": bool((ranks[layer] == 0).all())}
        for layer in range(logits.shape[0])
    ]


def first_stable_layer(hits: Sequence[bool]) -> int | None:
    """The first index from which every entry through the end is true; None if the last is not."""
    if not hits or not hits[-1]:
        return None
    i = len(hits) - 1
    while i > 0 and hits[i - 1]:
        i -= 1
    return i


def layer_diversity(first_layers: Sequence[int | None], n_layers: int) -> dict[str, Any]:
    """Summary of the first-decodable layers of a set: how early (mean, median) and how spread
    (sample standard deviation, n - 1, as every other table; entropy in bits of the layer
    histogram; distinct layers)."""
    decoded = [x for x in first_layers if x is not None]
    out: dict[str, Any] = {"n": len(first_layers), "decodable": len(decoded), "n_layers": n_layers,
                           "mean": None, "median": None, "std": None, "entropy_bits": None,
                           "distinct": len(set(decoded)),
                           "histogram": {str(k): v for k, v in sorted(Counter(decoded).items())}}
    if decoded:
        n = len(decoded)
        mean = sum(decoded) / n
        srt = sorted(decoded)
        out["mean"] = round(mean, 4)
        out["median"] = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
        # sample SD (n - 1), as every spread factmem prints; one decodable fact has none
        out["std"] = (round(math.sqrt(sum((x - mean) ** 2 for x in decoded) / (n - 1)), 4)
                      if n > 1 else None)
        out["entropy_bits"] = round(-sum(c / n * math.log2(c / n)
                                         for c in Counter(decoded).values()) + 0.0, 4)
    return out
