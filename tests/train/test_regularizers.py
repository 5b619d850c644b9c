"""EWC, L2 and KL regularizers: the penalty against hand computations, the Fisher as the mean of
squared per-example gradients, KL zero when student equals teacher, the Fisher file."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from factmem.config import ModelConfig, RegularizerConfig, StageConfig, StopConfig, TrainConfig
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train.loop import StageContext, forward_targets, train_stage
from factmem.train.regularizers import (
    FISHER_FILE,
    Distillation,
    WeightAnchor,
    build_regularizers,
    diagonal_fisher,
    distillation_kl,
    quadratic_penalty,
)

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=3), 5, 0, 0)
NEW = build_source("kvr", KVRParams(key_length=4, value_length=3), 4, 100, 0)


def context(model, fmt) -> StageContext:
    acc = Accelerator(cpu=True)
    return StageContext(model, acc, fmt, TrainConfig(), None, None, None)


def kl_term(cb, ctx, items):
    """The KL callback's term for one micro-batch that is the whole step."""
    ctx.batch_items = items
    ctx.micro = forward_targets(ctx.model, items, ctx.fmt.tok.pad_token_id, "cpu")
    return cb.extra_loss(ctx, items, 1.0)


def perturb(model, scale=1e-2, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            deltas[n] = torch.randn(p.shape, generator=g) * scale
            p.add_(deltas[n])
    return deltas


def test_quadratic_penalty_matches_hand_sum():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0, -1.0]])}
    p = {"x": torch.tensor([2.0, 2.0]), "y": torch.tensor([[0.5, 1.0]])}
    f = {"x": torch.tensor([3.0, 7.0]), "y": torch.tensor([[2.0, 0.1]])}
    # 3*1 + 7*0 + 2*0.25 + 0.1*4
    assert quadratic_penalty(p, a, f).item() == pytest.approx(3.9)
    assert quadratic_penalty(p, a).item() == pytest.approx(1 + 0.25 + 4)


def test_ewc_penalty_is_zero_at_the_anchor_and_equals_a_hand_computation(tiny, tmp_path):
    model, fmt = tiny
    cb = WeightAnchor(RegularizerConfig(kind="ewc", weight=5.0), FACTS, tmp_path)
    ctx = context(model, fmt)
    cb.on_stage_start(ctx)
    assert cb.extra_loss(ctx, [], share=0.5).item() == 0.0
    deltas = perturb(model)
    hand = sum(float((cb.fisher[n] * deltas[n] ** 2).sum()) for n in deltas)
    assert hand > 0
    got = cb.extra_loss(ctx, [], share=0.5).item()
    assert got == pytest.approx(5.0 * hand * 0.5, rel=1e-4)
    # the gradient of the penalty is 2 lambda F (theta - theta*) x share
    model.zero_grad()
    cb.extra_loss(ctx, [], share=1.0).backward()
    name, p = next(iter(model.named_parameters()))
    torch.testing.assert_close(p.grad, 2 * 5.0 * cb.fisher[name] * (p.detach() - cb.anchor[name]))
    report = cb.report()
    n = sum(p.numel() for p in model.parameters())
    assert report["extra_bytes"] == 2 * 4 * n  # float32 anchor + Fisher
    assert report["fisher_file"] == FISHER_FILE


def test_l2_is_ewc_with_unit_fisher(tiny):
    model, fmt = tiny
    cb = WeightAnchor(RegularizerConfig(kind="l2", weight=2.0))
    ctx = context(model, fmt)
    cb.on_stage_start(ctx)
    assert cb.extra_loss(ctx, [], 1.0).item() == 0.0
    deltas = perturb(model)
    hand = sum(float((d ** 2).sum()) for d in deltas.values())
    assert cb.extra_loss(ctx, [], 0.25).item() == pytest.approx(2.0 * hand * 0.25, rel=1e-4)
    assert cb.report()["extra_bytes"] == 4 * sum(p.numel() for p in model.parameters())


def hand_nll(model, fmt, ex) -> torch.Tensor:
    """The answer's negative log-likelihood from full logits, written out independently."""
    enc = fmt.encode(ex)
    ids = torch.tensor([enc.input_ids])
    logits = model(input_ids=ids).logits[0, :-1]
    labels = torch.tensor(enc.labels[1:])
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], reduction="sum")


def test_fisher_is_the_mean_of_squared_per_example_gradients(tiny):
    model, fmt = tiny
    model.train()
    fisher = diagonal_fisher(model, fmt, FACTS)
    sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ex in FACTS:
        model.zero_grad()
        hand_nll(model, fmt, ex).backward()
        for n, p in model.named_parameters():
            sq[n] += p.grad ** 2 / len(FACTS)
            mean[n] += p.grad / len(FACTS)
    for n in sq:
        torch.testing.assert_close(fisher[n], sq[n], rtol=1e-3, atol=1e-9, msg=n)
    # and not the square of the mean gradient (the common bug): they differ clearly
    total = sum(float(f.sum()) for f in fisher.values())
    total_bug = sum(float((m ** 2).sum()) for m in mean.values())
    assert total_bug < 0.9 * total
    assert model.training  # the train mode is restored


def test_fisher_is_saved_as_safetensors(tiny, tmp_path):
    from safetensors.torch import load_file

    model, fmt = tiny
    cb = WeightAnchor(RegularizerConfig(kind="ewc", normalize=True), FACTS, tmp_path)
    cb.on_stage_start(context(model, fmt))
    saved = load_file(str(tmp_path / FISHER_FILE))
    assert set(saved) == set(cb.fisher)
    for n, f in saved.items():
        torch.testing.assert_close(f, cb.fisher[n])
    mean = sum(float(f.sum()) for f in saved.values()) / sum(f.numel() for f in saved.values())
    assert mean == pytest.approx(1.0, rel=1e-4)  # normalize: mean 1


def test_kl_is_zero_when_student_equals_teacher(tiny):
    logits = torch.randn(6, 50)
    assert distillation_kl(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p, q = torch.randn(3, 10), torch.randn(3, 10)
    lq, lp = F.log_softmax(q, -1), F.log_softmax(p, -1)
    hand = sum(float((lq[i].exp() * (lq[i] - lp[i])).sum()) for i in range(3))  # a sum
    assert distillation_kl(p, q, 1.0).item() == pytest.approx(hand, rel=1e-5)

    model, fmt = tiny
    cb = Distillation(RegularizerConfig(kind="kl", weight=1.0, temperature=2.0))
    ctx = context(model, fmt)
    cb.on_stage_start(ctx)
    items = [fmt.encode(e) for e in NEW]
    assert kl_term(cb, ctx, items).item() == pytest.approx(0.0, abs=1e-6)
    perturb(model, scale=5e-2)
    assert kl_term(cb, ctx, items).item() > 1e-4
    assert cb.report()["extra_bytes"] >= 4 * sum(p.numel() for p in model.parameters())


def test_kl_on_mix_uses_only_mixing_items(tiny):
    model, fmt = tiny
    cb = Distillation(RegularizerConfig(kind="kl", on="mix"), mix_ids={NEW[0].id})
    ctx = context(model, fmt)
    cb.on_stage_start(ctx)
    perturb(model, scale=5e-2)
    only_facts = [fmt.encode(e) for e in FACTS]
    assert kl_term(cb, ctx, only_facts) is None
    with_mix = kl_term(cb, ctx, [fmt.encode(NEW[0]), *only_facts])
    alone = kl_term(cb, ctx, [fmt.encode(NEW[0])])
    assert with_mix.item() == pytest.approx(alone.item(), rel=1e-5)


def test_a_strong_l2_keeps_weights_near_the_anchor(tiny_model_dir):
    def train(regs):
        cfg = ModelConfig(name=str(tiny_model_dir))
        torch.manual_seed(0)
        model, fmt = load_model(cfg), Formatter(load_tokenizer(cfg))
        before = [p.detach().clone() for p in model.parameters()]
        acc = Accelerator(cpu=True)
        stage = StageConfig(name="s", set="x", regularizers=regs)
        tcfg = TrainConfig(lr=1e-2, batch_size=4, warmup_fraction=0.0, grad_clip=None,
                           stop=StopConfig(rule="epochs", epochs=2))
        train_stage(acc.prepare(model), acc, fmt, NEW, tcfg, seed=0, progress=False,
                    callbacks=build_regularizers(stage, FACTS, set(), None))
        return sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before))

    free = train([])
    held = train([RegularizerConfig(kind="l2", weight=1e4)])
    assert held < 0.5 * free
