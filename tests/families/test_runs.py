"""Every family through the commands a user runs: `factmem run` (two stages, REMIX random
words mixed into both, replay of stage 1 in stage 2, packed batches, analysis checkpoints) and
`factmem analyze` (logit lens, layer reversion); then fast exact match against `generate` on
the facts it trained. About 6 s a family on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from factmem import files
from factmem.analysis.logit_lens import lens_logits
from factmem.batch import pad_batch
from factmem.cli import main
from factmem.config import load_experiment
from factmem.evaluate import evaluate_examples
from factmem.models import Formatter, load_model, load_tokenizer, text_config
from factmem.sets import SetCache
from families.conftest import FAMILY_NAMES

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("family", FAMILY_NAMES)]

KVR = {"source": "kvr", "n": 4, "key_length": 4, "value_length": 2}
CONFIG = {
    "name": "family",
    # lr 1e-2 for 60 epochs of 2 steps: every family learns its facts. Exact match on 4 facts
    # is coarse and moves with the thread count (qwen2: 25% on 1 thread, 50% on 2), so the test
    # asks for the graded figures; measured on 1 thread: answer log-prob from -4.6 at base to
    # -0.65 or better, token accuracy 75-100%, exact match 25-100%.
    "train": {"lr": 1e-2, "batch_size": 4, "warmup_fraction": 0.0,
              "stop": {"rule": "epochs", "epochs": 60}},
    "sets": {"a": KVR, "b": {**KVR, "offset": 100}},
    "stages": [
        {"name": "s1", "set": "a", "mix": [{"source": "random-words", "ratio": 1, "length": 4}]},
        {"name": "s2", "set": "b", "mix": [{"source": "random-words", "ratio": 0.5, "length": 4}],
         "replay": [{"stage": "s1", "ratio": 0.5}]},
    ],
    "track": ["a", "b"],
    "seeds": [0],
    "output": {"save_checkpoints": True},
}


@pytest.fixture(scope="module")
def family_runs(family_dirs, tmp_path_factory):
    """family -> (config path, run directory), run and analyzed on first use."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            tmp = tmp_path_factory.mktemp(f"run-{name}")
            cfg = tmp / "family.yaml"
            cfg.write_text(yaml.safe_dump({**CONFIG, "model": {"name": str(family_dirs(name))}},
                                          sort_keys=False))
            assert main(["run", str(cfg), "--no-progress", "--output", str(tmp / "runs")]) == 0
            run = tmp / "runs" / "family"
            assert main(["analyze", str(run), "--what", "lens,reversion", "--no-progress"]) == 0
            done[name] = cfg, run
        return done[name]

    return get


def seed_dir(run: Path) -> Path:
    return run / "default" / "seed0"


def test_two_stage_remix_replay_run(family, family_runs, capsys):
    _, run = family_runs(family)
    capsys.readouterr()
    acc = json.loads((seed_dir(run) / "accuracy.json").read_text())
    for stage, name in (("s1", "a"), ("s2", "b")):  # both stages learned their own set
        assert acc["logprob"]["base"][name] < -3 < -1.5 < acc["logprob"][stage][name], acc
        assert acc["token_acc"][stage][name] >= 0.5 and acc["accuracy"][stage][name] > 0, acc
    for stage, roles in (("01-s1", ["main", "mix"]), ("02-s2", ["main", "mix", "replay"])):
        manifest = json.loads((seed_dir(run) / stage / "manifest.json").read_text())
        assert [c["role"] for c in manifest["components"]] == roles
        metrics = json.loads((seed_dir(run) / stage / "metrics.json").read_text())
        assert metrics["train"]["layout"] == "packed"
        assert metrics["train"]["steps"] == 120


def test_fast_exact_match_agrees_with_generate_on_trained_facts(family, family_runs):
    cfg_path, run = family_runs(family)
    cfg = load_experiment(cfg_path).first_variant
    sets = SetCache().sets(cfg)
    fmt = Formatter.for_model(load_tokenizer(cfg.model), cfg.model)
    verdicts = []
    for stage in ("01-s1", "02-s2"):
        model = load_model(cfg.model, str(seed_dir(run) / stage / "checkpoint")).eval()
        for name in ("a", "b"):
            fast = evaluate_examples(model, fmt, sets[name], "fast")
            gen = evaluate_examples(model, fmt, sets[name], "generate")
            assert [p.correct for p in fast] == [p.correct for p in gen], (stage, name)
            verdicts += [p.correct for p in fast]
    assert any(verdicts) and not all(verdicts)  # both verdicts occur


def test_logit_lens_of_the_trained_model_ends_at_its_logits(family, family_runs):
    """On trained weights the logits are large (soft-capping matters): the lens at the last
    layer is the model's logits, and a fact is decodable at the last layer iff its answer
    tokens are the model's top-1."""
    cfg_path, run = family_runs(family)
    cfg = load_experiment(cfg_path).first_variant
    fmt = Formatter.for_model(load_tokenizer(cfg.model), cfg.model)
    model = load_model(cfg.model, str(seed_dir(run) / "02-s2" / "checkpoint")).eval()
    b = SetCache().sets(cfg)["b"]
    ids, mask, _ = pad_batch([fmt.encode(e) for e in b], fmt.tok.pad_token_id)
    lens, logits = lens_logits(model, ids, mask, torch.arange(ids.shape[1]))
    torch.testing.assert_close(lens[-1], logits, rtol=1e-5, atol=1e-5)
    assert float(logits.abs().max()) > 5
    rows = [r for r in files.read_jsonl(run / "analysis" / "lens_facts.jsonl")
            if r["stage"] == "s2" and r["set"] == "b"]
    assert len(rows) == len(b)
    assert {r["n_layers"] for r in rows} == {text_config(model).num_hidden_layers}
    correct = {p["id"]: p["correct"]
               for p in files.read_jsonl(seed_dir(run) / "02-s2" / "predictions" / "b.jsonl")}
    for r in rows:  # exact match also needs the end-of-turn token, the lens does not
        assert r["first_layer"] is not None or not correct[r["id"]]


def test_layer_reversion_finds_every_layer(family, family_runs):
    """Reverting nothing is the stage's model, reverting everything the model before the
    stage (its checkpoint's own verdicts), one group per decoder layer in between."""
    _, run = family_runs(family)
    rows = [r for r in files.read_jsonl(run / "analysis" / "reversion.jsonl")
            if r["stage"] == "s2"]
    assert list(dict.fromkeys(r["group"] for r in rows)) == ["none", "1", "2", "other", "all"]

    def verdicts(stage: str) -> dict[str, bool]:
        path = seed_dir(run) / stage / "predictions" / "b.jsonl"
        return {p["id"]: p["correct"] for p in files.read_jsonl(path)}

    for group, stage in (("none", "02-s2"), ("all", "01-s1")):
        assert {r["id"]: r["correct"] for r in rows if r["group"] == group} == verdicts(stage)
