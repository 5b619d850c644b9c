"""Logit lens: the last layer is the model's own logits, a manual computation agrees, hooks go."""

import pytest
import torch

from factmem.analysis.layers import final_norm, layer_param_groups, unembedding
from factmem.analysis.logit_lens import (
    capture_residuals,
    first_stable_layer,
    layer_diversity,
    lens_logits,
    logit_lens,
)
from factmem.batch import pad_batch
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.errors import ModelError
from factmem.evaluate import evaluate_examples
from factmem.models import decoder_layers

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=3), 5, 0, 0)


def batch(fmt, examples):
    items = [fmt.encode(e) for e in examples]
    ids, mask, _ = pad_batch(items, fmt.tok.pad_token_id)
    return items, ids, mask


def test_last_layer_is_the_models_logits_and_hooks_are_removed(tiny):
    model, fmt = tiny
    _, layers = decoder_layers(model)
    _, ids, mask = batch(fmt, FACTS)
    positions = torch.arange(0, ids.shape[1])
    lens, logits = lens_logits(model, ids, mask, positions)
    assert lens.shape[0] == len(layers) + 1 == 3
    torch.testing.assert_close(lens[-1], logits, rtol=1e-5, atol=1e-5)
    assert not (lens[0] - logits).abs().max() < 1e-3  # earlier layers do differ
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_on_error(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError), capture_residuals(model):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_lens_matches_a_manual_computation(tiny):
    """Layer by layer by hand: embeddings, each block with the model's rotary embeddings, then
    final RMSNorm and the (tied) unembedding written out."""
    model, fmt = tiny
    _, ids, mask = batch(fmt, FACTS[:1])
    positions = torch.arange(0, ids.shape[1])
    lens, _ = lens_logits(model, ids, mask, positions)
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = inner.rotary_emb(h, pos)
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    manual = [h]
    with torch.no_grad():
        for layer in inner.layers:
            out = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
            manual.append(h)
    eps = model.config.rms_norm_eps
    for k, hk in enumerate(manual):
        normed = hk * torch.rsqrt(hk.pow(2).mean(-1, keepdim=True) + eps) * inner.norm.weight
        expect = normed @ inner.embed_tokens.weight.T  # tied unembedding
        torch.testing.assert_close(lens[k, 0], expect[0].detach(), rtol=1e-4, atol=1e-4)


def test_per_fact_rows_agree_with_exact_match(tiny):
    model, fmt = tiny
    layer_rows, fact_rows = logit_lens(model, fmt, FACTS, batch_size=2)
    assert len(layer_rows) == len(FACTS) * 3 and len(fact_rows) == len(FACTS)
    last = {r["id"]: r for r in layer_rows if r["layer"] == 2}
    preds = {p.id: p for p in evaluate_examples(model, fmt, FACTS)}
    for f in fact_rows:
        # top-1 on every answer token at the last layer is what greedy decoding needs (minus eos)
        assert last[f["id"]]["top1_all"] == (f["first_layer"] is not None)
        if preds[f["id"]].correct:
            assert f["first_layer"] is not None
    for r in layer_rows:
        assert 0 <= r["prob_first"] <= 1 and r["top1_first"] == (r["rank_first"] == 0)


def test_first_stable_layer_and_diversity():
    assert first_stable_layer([False, True, False, True, True]) == 3
    assert first_stable_layer([True, True, True]) == 0
    assert first_stable_layer([True, False]) is None
    d = layer_diversity([3, 3, 5, None], n_layers=6)
    assert d["decodable"] == 3 and d["mean"] == pytest.approx(11 / 3, abs=1e-3)
    assert d["distinct"] == 2
    assert d["entropy_bits"] == pytest.approx(0.9183, abs=1e-3)
    assert layer_diversity([4, 4], 6)["entropy_bits"] == 0
    assert layer_diversity([None], 6)["mean"] is None


def test_layer_spread_is_the_sample_sd():
    # every other table states the sample SD (n - 1): [3, 3, 5] -> sqrt(4/3 / 2 * 2) = 1.1547,
    # not the population SD 0.9428
    assert layer_diversity([3, 3, 5, None], n_layers=6)["std"] == pytest.approx(1.1547, abs=1e-4)
    assert layer_diversity([4], 6)["std"] is None  # one fact has no spread


def test_parts_are_found_generically(tiny):
    model, _ = tiny
    assert final_norm(model) is model.model.norm and unembedding(model) is model.lm_head
    groups = layer_param_groups(model, block=1)
    assert [g[0] for g in groups] == ["1", "2", "other"]
    assert sum(len(g[3]) for g in groups) == len(list(model.named_parameters()))

    class NoNorm(torch.nn.Module):
        config = model.config

        def get_output_embeddings(self):
            return None

    with pytest.raises(ModelError, match="final norm"):
        final_norm(NoNorm())


def test_lens_summary_pools_seeds_after_the_per_seed_rows():
    from factmem.analysis.analyze import summarize_tables

    def fact(seed, i, first):
        return {"variant": "remix", "seed": seed, "stage": "stage1", "set": "kvr_a",
                "id": f"kvr:{i}", "n_layers": 4, "first_layer": first,
                "first_layer_first_token": first}

    facts = [fact(0, 0, 2), fact(0, 1, 4), fact(1, 0, 3), fact(1, 1, None)]
    lens = summarize_tables({"lens_facts": facts}, ["lens"])["lens"]
    assert [r["seed"] for r in lens] == [0, 1, "all"]
    pooled = lens[-1]
    assert (pooled["n"], pooled["decodable"], pooled["mean"]) == (4, 3, 3.0)
    assert pooled["histogram"] == {"2": 1, "3": 1, "4": 1} and pooled["distinct"] == 3
    # one seed: no pooled row
    assert [r["seed"] for r in summarize_tables({"lens_facts": facts[:2]}, ["lens"])["lens"]] == [0]
