"""What a training step computes: the loss covers every labelled token of every assistant turn
and is divided by their count; packed rows give the padded batch's loss and gradients; the
reference code's label padding is reproduced exactly; KL is normalised like the loss."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from factmem.batch import packing_supported
from factmem.config import ModelConfig, RegularizerConfig, StopConfig, TrainConfig
from factmem.data import Example, build_source
from factmem.data.synthetic import KVRParams, RandomWordsParams
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train import StageCallback, train_stage
from factmem.train.loop import batch_loss, reference_label_padding
from factmem.train.regularizers import Distillation

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=3), 6, 0, 0)
WORDS = build_source("random-words", RandomWordsParams(length=6), 6, 0, 0)
CHAT = Example("chat:0", (("user", "hi"), ("assistant", "hello there"), ("user", "and then?"),
                          ("assistant", "bye")), ("bye",), kind="task")


def setup(model_dir, seed=0):
    cfg = ModelConfig(name=str(model_dir))
    torch.manual_seed(seed)
    return load_model(cfg), Formatter(load_tokenizer(cfg))


def full_logit_ce(model, items):
    """Reference: full logits of each item alone, cross-entropy over every labelled token."""
    total, count = torch.tensor(0.0), 0
    for e in items:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
        labels = torch.tensor(e.labels[1:])
        keep = labels != -100
        total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    return total, count


def test_multi_turn_items_are_trained_on_every_assistant_turn(tiny_model_dir):
    model, fmt = setup(tiny_model_dir)
    for examples in ([CHAT], [CHAT, FACTS[0]]):
        items = [fmt.encode(e) for e in examples]
        ref_sum, ref_count = full_logit_ce(model, items)
        for pack in (False, True):
            loss_sum, count, _ = batch_loss(model, items, fmt.tok.pad_token_id, "cpu", pack=pack)
            assert count == ref_count == sum(e.n_targets for e in items)
            assert loss_sum.item() == pytest.approx(ref_sum.item(), rel=1e-5)
    # the logged step loss is that sum over the same count (the loop's denominator)
    acc = Accelerator(cpu=True)
    cfg = TrainConfig(lr=1e-9, batch_size=2, warmup_fraction=0.0,
                      stop=StopConfig(rule="epochs", epochs=1))
    ref_sum, ref_count = full_logit_ce(model, [fmt.encode(CHAT), fmt.encode(FACTS[0])])
    result = train_stage(acc.prepare(model), acc, fmt, [CHAT, FACTS[0]], cfg, seed=0,
                         progress=False)
    assert result.log[0]["loss"] == pytest.approx(ref_sum.item() / ref_count, rel=1e-5)


def grads_of(model, items, pad_id, pack):
    model.zero_grad()
    loss_sum, count, _ = batch_loss(model, items, pad_id, "cpu", pack=pack)
    (loss_sum / count).backward()
    return loss_sum.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_packed_equals_padded(model, fmt, examples, tol=1e-5):
    """Loss to `tol` relative; every gradient tensor to `tol` of its largest entry (float32
    summation order differs between the two layouts, nothing else does)."""
    items = [fmt.encode(e) for e in examples]
    assert len({len(e) for e in items}) > 1, "the check needs items of different lengths"
    loss_pad, g_pad = grads_of(model, items, fmt.tok.pad_token_id, pack=False)
    loss_pack, g_pack = grads_of(model, items, fmt.tok.pad_token_id, pack=True)
    assert loss_pack == pytest.approx(loss_pad, rel=tol)
    for n in g_pad:
        scale = float(g_pad[n].abs().max())
        assert float((g_pack[n] - g_pad[n]).abs().max()) <= tol * scale, n


def test_packed_rows_give_the_padded_loss_and_gradients(tiny_model_dir):
    model, fmt = setup(tiny_model_dir)
    assert packing_supported(model)
    assert_packed_equals_padded(model, fmt, [*FACTS[:3], *WORDS[:3], CHAT])


class PositionBlind(torch.nn.Module):
    """A model whose forward ignores position_ids (as custom attention code may): packed items
    would see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_a_model_that_ignores_packed_positions_falls_back_to_padding(tiny_model_dir, caplog):
    model, fmt = setup(tiny_model_dir)
    blind = PositionBlind(model)
    assert not packing_supported(blind)
    acc = Accelerator(cpu=True)
    cfg = TrainConfig(lr=1e-3, batch_size=4, stop=StopConfig(rule="epochs", epochs=1))
    caplog.set_level(logging.WARNING, logger="factmem")
    result = train_stage(acc.prepare(blind), acc, fmt, FACTS[:4], cfg, seed=0, progress=False)
    assert result.layout == "padded" and "padding each micro-batch instead" in caplog.text
    ok = train_stage(acc.prepare(model), acc, fmt, FACTS[:4], cfg, seed=0, progress=False)
    assert ok.layout == "packed" and ok.padding_fraction == 0.0


@pytest.mark.slow
def test_packed_equals_padded_on_the_embedded_model():
    from factmem.data.generic import GenericParams

    model, fmt = setup("smollm2-135m")
    generic = build_source("generic", GenericParams(prompt_words=12, target_words=12), 2, 0, 0)
    assert packing_supported(model)
    # measured: loss 7.6e-8 relative, gradients at most 8.3e-6 of each tensor's largest entry
    assert_packed_equals_padded(model, fmt, [*FACTS[:2], *WORDS[:2], *generic])


def test_reference_label_padding_matches_a_hand_built_batch(tiny_model_dir):
    """The reference pads every item of the stage to the stage's longest with eos, labels the
    padding with eos, and its loss is the model's mean over those labels."""
    model, fmt = setup(tiny_model_dir)
    short, long_ = fmt.encode(FACTS[0]), fmt.encode(WORDS[0])
    eos = fmt.eos_id
    padded = reference_label_padding([short, long_], eos)
    width = len(long_)
    assert [len(e) for e in padded] == [width, width]
    tail = width - len(short)
    assert padded[0].input_ids == short.input_ids + [eos] * tail
    assert padded[0].labels == short.labels + [eos] * tail  # labelled, not -100
    assert padded[1].labels == long_.labels
    # hand-built reference batch: ids and labels as the reference code collates them
    ids = torch.tensor([short.input_ids + [eos] * tail, long_.input_ids])
    labels = torch.tensor([short.labels + [eos] * tail, long_.labels])
    hf_loss = model(input_ids=ids, labels=labels).loss  # mean over labels != -100, shifted
    loss_sum, count, _ = batch_loss(model, padded, fmt.tok.pad_token_id, "cpu", pack=True)
    assert count == int((labels[:, 1:] != -100).sum())
    assert (loss_sum / count).item() == pytest.approx(hf_loss.item(), rel=1e-5)
    # and the stage loop trains on exactly that when asked
    acc = Accelerator(cpu=True)
    cfg = TrainConfig(lr=1e-9, batch_size=2, label_padding="reference",
                      stop=StopConfig(rule="epochs", epochs=1))
    result = train_stage(acc.prepare(model), acc, fmt, [FACTS[0], WORDS[0]], cfg, seed=0,
                         progress=False)
    assert result.log[0]["loss"] == pytest.approx(hf_loss.item(), rel=1e-5)
    assert result.tokens == 2 * width


class FirstGrads(StageCallback):
    def on_before_optimizer_step(self, ctx):
        if ctx.step == 0:
            self.grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters()}


class Nudge(StageCallback):
    """Moves the student off its teacher after the teacher is taken, so KL has a gradient."""

    def on_stage_start(self, ctx):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 3e-2)


def test_kl_penalty_does_not_depend_on_gradient_accumulation(tiny_model_dir):
    """KL on the mixing items only: with grad_accum 2 one micro-batch may hold no mixing item;
    the step's penalty (and gradient) must be the same as with one micro-batch."""
    examples = [*FACTS[:3], WORDS[0]]  # 3 facts + 1 mixing item, one batch of 4
    grads = []
    for accum in (1, 2):
        model, fmt = setup(tiny_model_dir)
        kl = Distillation(RegularizerConfig(kind="kl", weight=20.0, on="mix"),
                          mix_ids={WORDS[0].id})
        first = FirstGrads()
        acc = Accelerator(cpu=True)
        cfg = TrainConfig(lr=1e-3, batch_size=4, grad_accum=accum, grad_clip=None,
                          stop=StopConfig(rule="epochs", epochs=1))
        train_stage(acc.prepare(model), acc, fmt, examples, cfg, seed=0, progress=False,
                    callbacks=[kl, Nudge(), first])
        grads.append(first.grads)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)
