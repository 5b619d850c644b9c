"""Evaluation: fast teacher-forced mode agrees with `generate` on every fact; task sets are
generated and report ROUGE-L and loss; accuracy matrix and forgetting."""

import pytest
import torch

from factmem.config import ModelConfig, StopConfig, TrainConfig
from factmem.data import Example, build_source
from factmem.data.synthetic import KVRParams
from factmem.evaluate import evaluate_examples, forgetting
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train import train_stage


def test_forgetting_is_own_stage_minus_final():
    matrix = {"base": {"a": 0.0, "b": 0.0}, "s1": {"a": 1.0, "b": 0.0}, "s2": {"a": 0.25, "b": 1.0}}
    assert forgetting(matrix, {"a": "s1", "b": "s2"}) == {"a": 0.75, "b": 0.0}


@pytest.fixture(scope="module")
def partly_trained(tiny_model_dir):
    """A tiny model trained until some, not all, facts are memorized."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    cfg = ModelConfig(name=str(tiny_model_dir))
    tok = load_tokenizer(cfg)
    fmt = Formatter(tok)
    model = load_model(cfg)
    facts = build_source("kvr", KVRParams(key_length=4, value_length=2), 24, 0, 0)
    train = TrainConfig(lr=5e-3, batch_size=8, warmup_fraction=0.0,
                        stop=StopConfig(rule="epochs", epochs=60))  # ~half memorized
    acc = Accelerator(cpu=True)
    train_stage(acc.prepare(model), acc, fmt, facts, train, seed=0, progress=False)
    return model, fmt, facts


def test_fast_mode_gives_the_same_verdict_as_generate(partly_trained):
    model, fmt, facts = partly_trained
    fast = evaluate_examples(model, fmt, facts, mode="fast", batch_size=16)
    gen = evaluate_examples(model, fmt, facts, mode="generate", batch_size=16, max_new_tokens=8)
    verdicts = [p.correct for p in fast]
    assert 0 < sum(verdicts) < len(facts), "the check needs right and wrong facts"
    assert verdicts == [p.correct for p in gen]
    for f, g in zip(fast, gen):
        if f.correct:
            assert f.prediction == g.prediction


def test_aliases_count_in_fast_mode(partly_trained):
    model, fmt, facts = partly_trained
    right = next(p for p in evaluate_examples(model, fmt, facts) if p.correct)
    ex = next(e for e in facts if e.id == right.id)
    wrong_first = Example.qa(ex.id, ex.prompt, "zzz", aliases=[ex.target])
    assert evaluate_examples(model, fmt, [wrong_first])[0].correct
    assert not evaluate_examples(model, fmt, [Example.qa(ex.id, ex.prompt, "zzz")])[0].correct


def test_generate_ignores_the_models_shipped_generation_config(partly_trained):
    """A generation_config.json with a repetition penalty and n-gram blocking must not change
    what greedy decoding means (transformers would apply them to every generate call)."""
    model, fmt, facts = partly_trained
    fast = [p.correct for p in evaluate_examples(model, fmt, facts, mode="fast", batch_size=16)]
    shipped = model.generation_config
    try:
        model.generation_config = type(shipped)(**{**shipped.to_dict(), "no_repeat_ngram_size": 1,
                                                   "repetition_penalty": 5.0})
        gen = evaluate_examples(model, fmt, facts, mode="generate", batch_size=16,
                                max_new_tokens=8)
        assert model.generation_config.no_repeat_ngram_size == 1  # restored after the call
    finally:
        model.generation_config = shipped
    assert [p.correct for p in gen] == fast and all(p.predicted_by == "generate" for p in gen)


def test_generated_answers_are_decoded_without_space_clean_up(tiny_model_dir):
    """Llama-3 tokenizers clean up spaces on decode (" ." -> "."): a memorized gold "ab ." must
    still be predicted as "ab ." in generate mode, as fast mode sees it."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    cfg = ModelConfig(name=str(tiny_model_dir))
    fmt = Formatter(load_tokenizer(cfg))
    model = load_model(cfg)
    fact = [Example.qa("x:0", "Say it", "ab .")]
    train = TrainConfig(lr=1e-2, batch_size=1, warmup_fraction=0.0,
                        stop=StopConfig(rule="until_memorized", epochs=60))
    acc = Accelerator(cpu=True)
    train_stage(acc.prepare(model), acc, fmt, fact, train, seed=0, progress=False)
    fmt.tok.clean_up_tokenization_spaces = True
    # transformers >= 5.2x skips the clean-up for BPE tokenizers unless forced; older releases
    # (factmem accepts >= 4.46) ran it for Llama-3's BPE tokenizer: force it, as they did
    fmt.tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    fast = evaluate_examples(model, fmt, fact, mode="fast")[0]
    gen = evaluate_examples(model, fmt, fact, mode="generate", max_new_tokens=8)[0]
    assert fast.correct and gen.correct and gen.prediction == "ab ."


def test_answers_are_stripped_where_examples_are_made():
    """A gold with a trailing space could never equal a stripped prediction in fast mode."""
    ex = Example.qa("x:0", "q", "Paris ", aliases=[" paris", "", "Paris"])
    assert ex.target == "Paris" and ex.answers == ("Paris", "paris")


def test_task_sets_are_generated_and_report_rouge_and_loss(tiny_model_dir):
    from factmem.config import ModelConfig
    from factmem.evaluate import evaluate_examples, summarize
    from factmem.models import Formatter, load_model, load_tokenizer

    cfg = ModelConfig(name=str(tiny_model_dir))
    model, fmt = load_model(cfg), Formatter(load_tokenizer(cfg))
    task = Example.qa("t:0", "Add 2 and 3.", "2 + 3 = 5\n#### 5", kind="task", match="number")
    fact = Example.qa("f:0", "Capital?", "Paris")
    preds = evaluate_examples(model, fmt, [task, fact], mode="fast", max_new_tokens=8)
    assert preds[0].rouge_l is not None and preds[1].rouge_l is None
    summary = summarize(preds)
    # the task loss is the mean NLL per answer token of the task items (not a mean of
    # per-item means, nor mixed with the factoid's figures)
    assert "rouge_l" in summary and preds[0].answer_tokens == len("2 + 3 = 5\n#### 5") + 1
    assert summary["loss"] == pytest.approx(-preds[0].logprob)
