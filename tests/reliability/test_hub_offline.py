"""A hub id while the hub cannot be reached: one line within seconds, saying so and what to do,
for models and for public data sets read from the hub. Before: 48 s of retries and 45 warnings.

The hub's endpoint is pointed at a closed local port, so the test behaves the same with or
without a network."""

import time

import pytest

from factmem.cli import main

from .test_bad_inputs import write_config


@pytest.fixture
def no_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def run_timed(args, capsys) -> tuple[str, float]:
    start = time.perf_counter()
    assert main(args) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err[-2000:]
    return err, seconds


@pytest.mark.parametrize("mode", [[], ["--dry-run"]], ids=["run", "dry run"])
def test_an_unknown_hub_model_offline_is_one_line_within_seconds(mode, no_hub, tiny_model_dir,
                                                                 tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    err, seconds = run_timed(["run", str(cfg), "--no-progress", *mode,
                              "--set", "model.name=someorg/unknown-model"], capsys)
    assert seconds < 10
    assert err.startswith("factmem: error: model 'someorg/unknown-model': not a local directory, "
                          "and the Hugging Face hub (http://127.0.0.1:9) is unreachable ("), err
    assert "set HF_HUB_OFFLINE=1" in err and "give a local directory holding the model" in err
    assert not (tmp_path / "runs").exists()


def test_a_public_set_from_the_hub_offline_is_one_line_within_seconds(no_hub, tiny_model_dir,
                                                                      tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    err, seconds = run_timed(["run", str(cfg), "--no-progress", "--dry-run",
                              "--set", "sets.kvr_a=!replace {source: popqa, n: 2}"], capsys)
    assert seconds < 10
    assert err.startswith("factmem: error: sets.kvr_a: hub dataset akariasai/PopQA[test]: the "
                          "Hugging Face hub (http://127.0.0.1:9) is unreachable ("), err
    assert err.endswith("or give `path` to a local copy\n"), err


def test_offline_mode_is_not_probed(monkeypatch):
    from huggingface_hub import constants

    from factmem import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert hub.unreachable() is None  # the libraries read their cache only, and fail fast
