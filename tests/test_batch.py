"""Model inputs: packed rows keep their items apart (each item's logits equal the item run alone),
a packed batch cannot carry an attention mask, and logits are read at the right positions even
from a forward that ignores `logits_to_keep`."""

from __future__ import annotations

import pytest
import torch

from factmem.batch import ModelBatch, answer_logits, packed, pad_batch, target_logits
from factmem.data import build_source
from factmem.data.synthetic import KVRParams, RandomWordsParams

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=3), 3, 0, 0)
WORDS = build_source("random-words", RandomWordsParams(length=6), 2, 0, 0)


def alone_logits(model, items) -> torch.Tensor:
    """Each item's logits at its target positions, computed with the item alone in its row."""
    out = []
    for e in items:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
        targets = torch.tensor([*e.labels[1:], -100])
        out.append(logits[targets != -100])
    return torch.cat(out)


@torch.no_grad()
def test_each_packed_item_gives_its_logits_alone(tiny):
    model, fmt = tiny
    model.eval()
    items = [fmt.encode(e) for e in [*FACTS, *WORDS]]
    batch = packed(items, fmt.tok.pad_token_id, width=sum(len(e) for e in items))
    assert batch.input_ids.shape[0] == 1  # one row: every item beside every other
    logits, _, owner = target_logits(model, batch)
    # target_logits is row-major: reorder per item to compare with the items run alone
    order = torch.cat([torch.nonzero(owner == i).squeeze(1) for i in range(len(items))])
    expected = alone_logits(model, items)
    scale = float(expected.abs().max())
    assert float((logits[order] - expected).abs().max()) <= 1e-5 * scale
    # the check can fail: the same row with an all-ones mask lets the items see each other
    leaky = model(input_ids=batch.input_ids, attention_mask=torch.ones_like(batch.input_ids),
                  position_ids=batch.position_ids).logits[0]
    keep = batch.targets[0] != -100
    assert float((leaky[keep][order] - expected).abs().max()) > 1e-2 * scale


def test_a_packed_batch_refuses_an_attention_mask(tiny):
    _, fmt = tiny
    b = packed([fmt.encode(e) for e in FACTS], fmt.tok.pad_token_id)
    with pytest.raises(ValueError, match="must not carry an attention mask"):
        ModelBatch(b.input_ids, torch.ones_like(b.input_ids), b.position_ids, b.targets, b.owner)


class KwargsSwallower(torch.nn.Module):
    """A model with the transformers 4.46-4.49 API (`num_logits_to_keep`) or a remote-code
    `**kwargs` forward: `logits_to_keep` is accepted and ignored, every position comes back."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, num_logits_to_keep=0,
                **kwargs):
        kwargs.pop("logits_to_keep", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids)


@torch.no_grad()
def test_a_forward_that_ignores_logits_to_keep_is_sliced(tiny):
    model, fmt = tiny
    model.eval()
    old = KwargsSwallower(model)
    items = [fmt.encode(e) for e in FACTS]
    ids, mask, _ = pad_batch(items, fmt.tok.pad_token_id, left=True)
    first = ids.shape[1] - max(len(e) - e.prompt_len for e in items) - 1
    want, pos = answer_logits(model, ids, mask, first)
    got, pos_old = answer_logits(old, ids, mask, first)
    assert torch.equal(pos, pos_old) and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)
    for b in (packed(items, fmt.tok.pad_token_id), ):
        w, g_want, _ = target_logits(model, b)
        o, g_old, _ = target_logits(old, b)
        assert torch.equal(g_want, g_old) and torch.allclose(o, w, atol=1e-6)
