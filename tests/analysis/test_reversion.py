"""Layer reversion: reverting every layer restores the pre-stage model exactly, and the model is
put back exactly afterwards."""

import torch
from accelerate import Accelerator

from factmem.analysis.layers import layer_param_groups
from factmem.analysis.reversion import layer_reversion, reverted
from factmem.batch import pad_batch
from factmem.config import ModelConfig, StopConfig, TrainConfig
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.evaluate import evaluate_examples
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train import train_stage

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=2), 8, 0, 0)


def trained(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir))
    torch.manual_seed(0)
    model, fmt = load_model(cfg), Formatter(load_tokenizer(cfg))
    pre = {n: t.detach().clone() for n, t in model.state_dict().items()}
    acc = Accelerator(cpu=True)
    tcfg = TrainConfig(lr=3e-3, batch_size=8, warmup_fraction=0.0,
                       stop=StopConfig(rule="epochs", epochs=4))
    train_stage(acc.prepare(model), acc, fmt, FACTS, tcfg, seed=0, progress=False)
    return model.eval(), fmt, pre


def logits(model, fmt):
    ids, mask, _ = pad_batch([fmt.encode(e) for e in FACTS], fmt.tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_reverting_every_layer_restores_the_pre_stage_model(tiny_model_dir):
    model, fmt, pre = trained(tiny_model_dir)
    after = {n: t.detach().clone() for n, t in model.state_dict().items()}
    pre_model = load_model(ModelConfig(name=str(tiny_model_dir))).eval()
    pre_model.load_state_dict(pre)
    names = [n for g in layer_param_groups(model, block=1) for n in g[3]]
    with reverted(model, pre, names):
        for n, t in model.state_dict().items():
            assert torch.equal(t, pre[n]), n
        assert torch.equal(logits(model, fmt), logits(pre_model, fmt))
    for n, t in model.state_dict().items():  # and back exactly
        assert torch.equal(t, after[n]), n


def test_reversion_rows_per_group(tiny_model_dir):
    model, fmt, pre = trained(tiny_model_dir)
    rows = layer_reversion(model, pre, fmt, FACTS, block=1)
    groups = [r["group"] for r in rows[:: len(FACTS)]]
    assert groups == ["none", "1", "2", "other", "all"]
    by = {(r["group"], r["id"]): r for r in rows}
    trained_preds = {p.id: p for p in evaluate_examples(model, fmt, FACTS)}
    for e in FACTS:
        assert by[("none", e.id)]["token_acc"] == trained_preds[e.id].token_acc
    # reverting one layer changes the model: its answers get less likely on average
    mean = lambda g: sum(by[(g, e.id)]["logprob"] for e in FACTS) / len(FACTS)  # noqa: E731
    assert mean("1") < mean("none") and mean("all") < mean("none")
    assert len({r["group"] for r in layer_reversion(model, pre, fmt, FACTS, block=2)}) == 4
