"""Every kind of bad input is refused before anything is written: one line on stderr naming the
file/line/key, exit code 2, no run directory."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from factmem.cli import main


def write_config(model_dir: Path, tmp: Path) -> Path:
    cfg = {
        "name": "tiny",
        "model": {"name": str(model_dir)},
        "train": {"lr": 3e-3, "batch_size": 4, "stop": {"rule": "epochs", "epochs": 1}},
        "sets": {"kvr_a": {"source": "kvr", "n": 4, "key_length": 4, "value_length": 3},
                 "kvr_b": {"source": "kvr", "n": 4, "offset": 2000, "key_length": 4,
                           "value_length": 3}},
        "stages": [{"name": "stage1", "set": "kvr_a"}, {"name": "stage2", "set": "kvr_b"}],
        "output": {"dir": str(tmp / "runs")},
    }
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def data_file(tmp: Path, content: bytes | str, name: str = "qa.jsonl") -> str:
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


ROW = '{"id": "%s", "question": "%s", "answer": "x"}\n'
NEW_KVR_A = "sets.kvr_a=!replace "  # a new definition of the set (a mapping alone merges)

# (case, how to break the input: fn(tmp, config_path, model_dir) -> extra CLI args, message)
CASES = {
    "malformed YAML": (
        lambda t, c, m: c.write_text("name: x\nsets: {a: [1, 2}\n") and [],
        "exp.yaml:2:"),
    "non-UTF-8 config": (
        lambda t, c, m: c.write_bytes(b"name: caf\xe9\n") and [], "exp.yaml: not UTF-8"),
    "unknown key": (
        lambda t, c, m: ["--set", "trian.lr=1"], "trian: unknown key; did you mean 'train'?"),
    "unknown nested key": (
        lambda t, c, m: ["--set", "train.stop.epoch=3"],
        "train.stop.epoch: unknown key; did you mean 'epochs'?"),
    "wrong type": (
        lambda t, c, m: ["--set", "train.batch_size=eight"],
        "train.batch_size: expected an integer, got 'eight'"),
    "negative ratio": (
        lambda t, c, m: ["--set", "stages.stage2.mix=[{source: generic, ratio: -2}]"],
        "stages.1.mix.0.ratio: must be >= 0, got -2"),
    "mixing ratio past the bound": (  # refused at once, before billions of items are built
        lambda t, c, m: ["--set", "stages.stage1.mix=[{source: random-words, ratio: 1.0e9}]"],
        "stages.0.mix.0: asks for ratio 1e+09 x 4 items = 4000000000 items of random-words; "
        "at most 1,000,000 per component"),
    "more mixing than the pool holds": (
        lambda t, c, m: ["--set", "stages.stage1.mix=[{source: generic, ratio: 100}]"],
        "stages.0.mix.0: asks for 400 items of generic, but its pool holds 370"),
    "lr zero": (lambda t, c, m: ["--set", "train.lr=0"], "train.lr: must be > 0, got 0"),
    "lr negative": (lambda t, c, m: ["--set", "train.lr=-1e-5"], "train.lr: must be > 0"),
    "zero batch": (lambda t, c, m: ["--set", "train.batch_size=0"],
                   "train.batch_size: must be >= 1, got 0"),
    "zero batch in one stage": (lambda t, c, m: ["--set", "stages.stage2.train.batch_size=0"],
                                "stages.1.train.batch_size: must be >= 1, got 0"),
    "unknown source": (
        lambda t, c, m: ["--set", "sets.kvr_a.source=kvrr"],
        "sets.kvr_a.source: unknown source 'kvrr' (did you mean 'kvr'?); valid sources:"),
    "unknown set reference": (
        lambda t, c, m: ["--set", "stages.stage2.set=kvr_c"], "stages.1.set: no set named 'kvr_c'"),
    "missing file": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{source: jsonl, path: /nonexistent/qa.jsonl}"],
        "/nonexistent/qa.jsonl: no such file"),
    "row missing a field": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}}}".format(data_file(
            t, ROW % ("a", "q1") + '{"question": "q2"}\n'))],
        "qa.jsonl:2: row has no field 'answer'"),
    "malformed JSON row": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}}}".format(data_file(
            t, ROW % ("a", "q1") + '{"question": "q2", \n'))], "qa.jsonl:2: malformed JSON"),
    "non-UTF-8 data": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}}}".format(data_file(
            t, (ROW % ("a", "q1")).encode() + b'{"question": "caf\xe9", "answer": "x"}\n'))],
        "qa.jsonl:2: not UTF-8"),
    "duplicate ids": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}, id_field: id}}".format(
            data_file(t, ROW % ("q1", "a") + ROW % ("q2", "b") + ROW % ("q1", "c")))],
        "sets.kvr_a: source 'jsonl' produced duplicate id 'jsonl:q1'"),
    "empty data file": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}}}".format(
            data_file(t, "\n"))],
        "qa.jsonl: no rows"),
    "empty set": (lambda t, c, m: ["--set", "sets.kvr_a.n=0"], "sets.kvr_a.n: must be >= 1"),
    "item longer than model.max_length": (
        lambda t, c, m: ["--set", "model.max_length=16"], "longer than model.max_length = 16"),
    "item longer than the model's context": (
        lambda t, c, m: ["--set", "model.max_length=4096", "--set",
                         NEW_KVR_A + "{{source: jsonl, path: {}}}".format(
                             data_file(t, ROW % ("a", "q" * 600)))],
        "tokens, longer than the model's context (512 positions"),
    "run name escaping upwards": (
        lambda t, c, m: ["--set", "name=../escaped"],
        "name: '../escaped' is not a plain name"),
    "absolute run name": (
        lambda t, c, m: ["--set", "name=/tmp/escaped"], "name: '/tmp/escaped' is not a plain"),
    "checkpoint_every zero": (
        lambda t, c, m: ["--set", "output.checkpoint_every=0"],
        "output.checkpoint_every: must be >= 1 or null, got 0"),
    "missing local model directory": (  # not tried on the hub for a minute: tests/ is local
        lambda t, c, m: ["--set", "model.name=tests/no-such-model"],
        "model directory tests/no-such-model does not exist"),
    "missing model": (
        lambda t, c, m: ["--set", "model.name=/nonexistent/model"],
        "model '/nonexistent/model' not found"),
    "lr NaN": (lambda t, c, m: ["--set", "train.lr=.nan"],
               "train.lr: must be a finite number, got nan"),
    "lr NaN as a word": (lambda t, c, m: ["--set", "train.lr=nan"],
                         "train.lr: must be a finite number, got nan"),
    "lr infinite": (lambda t, c, m: ["--set", "train.lr=.inf"],
                    "train.lr: must be a finite number, got inf"),
    "lr overflowing to infinity": (lambda t, c, m: ["--set", "train.lr=1e999"],
                                   "train.lr: must be a finite number, got inf"),
    "beta infinite": (lambda t, c, m: ["--set", "train.betas=[0.9, .inf]"],
                      "train.betas.1: must be a finite number, got inf"),
    "stop threshold NaN in one stage": (
        lambda t, c, m: ["--set", "stages.stage2.train.stop={rule: loss_below, threshold: .nan}"],
        "stages.1.train.stop.threshold: must be a finite number, got nan"),
    "mix ratio infinite": (
        lambda t, c, m: ["--set", "stages.stage2.mix=[{source: generic, ratio: .inf}]"],
        "stages.1.mix.0.ratio: must be a finite number, got inf"),
    "regularizer weight NaN": (
        lambda t, c, m: ["--set", "stages.stage2.regularizers=[{kind: l2, weight: .nan}]"],
        "stages.1.regularizers.0.weight: must be a finite number, got nan"),
    "duplicate key in the YAML file": (
        lambda t, c, m: c.write_text(c.read_text() + "name: again\n") and [],
        "duplicate key 'name' (lines "),
    "duplicate key in a --set value": (
        lambda t, c, m: ["--set", "train={lr: 1.0e-3, lr: 2.0e-3}"],
        "duplicate key 'lr' (twice on line 1)"),
    "directory as a data path": (
        lambda t, c, m: ["--set", NEW_KVR_A + f"{{source: jsonl, path: {t}}}"],
        "a directory, neither a data file (.jsonl, .json, .csv, .tsv, .parquet) nor a"),
    "empty answer": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}}}".format(data_file(
            t, ROW % ("a", "q1") + '{"question": "q2", "answer": " "}\n'))],
        "qa.jsonl:2: field 'answer': empty answer"),
    "truncated last JSONL line": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}}}".format(data_file(
            t, ROW % ("a", "q1") + '{"question": "q2", "ans'))],
        "the file ends in the middle of this row (truncated?)"),
    "n larger than the file": (
        lambda t, c, m: ["--set", NEW_KVR_A + "{{source: jsonl, path: {}, n: 5}}".format(data_file(
            t, ROW % ("a", "q1") + ROW % ("b", "q2")))],
        "qa.jsonl has 2 items; cannot take n=5 from offset=0"),
}

# --dry-run runs every check of the real run: it must refuse exactly the same inputs
MODES = {"run": [], "dry run": ["--dry-run"]}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_line_exit_2_and_nothing_written(case, mode, tiny_model_dir,
                                                                      tmp_path, capsys):
    cfg = write_config(tiny_model_dir, tmp_path)
    breaker, message = CASES[case]
    extra = breaker(tmp_path, cfg, tiny_model_dir) or []
    assert main(["run", str(cfg), "--no-progress", *MODES[mode], *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("mode", list(MODES))
def test_a_tracker_named_but_not_installed_is_refused_before_the_run(mode, tiny_model_dir,
                                                                     tmp_path, capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    cfg = write_config(tiny_model_dir, tmp_path)
    args = ["run", str(cfg), "--no-progress", *MODES[mode], "--set", "output.report_to=[wandb]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == ("factmem: error: output.report_to: 'wandb' is not installed (pip install "
                   "wandb); installed trackers: none\n"), err
    assert not (tmp_path / "runs").exists()
    assert main([*args[:-1], "output.report_to=[tensorbored]"]) == 2  # not a tracker at all
    assert "'tensorbored' is not one of 'tensorboard', 'wandb'" in capsys.readouterr().err


def test_remote_code_is_never_run_without_trust_remote_code(tiny_model_dir, tmp_path, capsys):
    """A model directory that ships its own code: refused unless the config trusts it."""
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "code-was-run"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="factmem-custom",
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (model / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = write_config(model, tmp_path)
    assert main(["run", str(cfg), "--no-progress", "--dry-run"]) == 2  # refused there too
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: model ") and err.count("\n") == 1, err
    assert "trust_remote_code" in err, err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def _float_fields():
    """(class, field, type) for every config or source-parameter field that takes a number."""
    import dataclasses
    import typing

    from factmem import config
    from factmem.data.registry import SOURCES

    def takes_float(tp) -> bool:
        return tp is float or any(takes_float(a) for a in typing.get_args(tp))

    classes = {c for c in vars(config).values() if dataclasses.is_dataclass(c)}
    classes |= {spec.params for spec in SOURCES.values()}
    for cls in sorted(classes, key=lambda c: c.__name__):
        for name, tp in typing.get_type_hints(cls).items():
            if takes_float(tp):
                yield cls.__name__, name, tp


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "-inf"])
def test_every_float_field_refuses_non_finite_values(value):
    """All config values pass through one coercion; every number-typed field refuses NaN/inf,
    naming the field."""
    import typing

    from factmem.config import _coerce, _Invalid

    fields = list(_float_fields())
    assert len(fields) >= 10 and ("TrainConfig", "lr", float) in fields
    for cls, name, tp in fields:
        with pytest.raises(_Invalid, match=rf"^{cls}\.{name}(\.\d)?: must be a finite number"):
            _coerce([value, value] if typing.get_origin(tp) is tuple else value, tp,
                    f"{cls}.{name}")
