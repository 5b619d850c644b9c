"""Raw config -> resolved `Experiment`: sets, stages (each stage's `train` merged over the
top-level one), cross-section checks, then one parse per variant.

Loading checks everything before any work starts: unknown keys (with the nearest valid one),
wrong types, out-of-range values, unknown sources and set names. Errors are one line naming the
file and the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from factmem.config.checks import (
    _check_names,
    _check_references,
    _check_selection,
    _check_variant_baselines,
    _check_variant_folders,
)
from factmem.config.coerce import _as_list, _Invalid, _parse_with_source_params, parse
from factmem.config.overrides import (
    Experiment,
    _deep_merge,
    _variant_raw,
    apply_override,
    expand_variants,
    parse_override,
)
from factmem.config.schema import (
    ExperimentConfig,
    MixConfig,
    SetConfig,
    StageConfig,
    TrainConfig,
)
from factmem.config.yaml_io import read_yaml
from factmem.errors import ConfigError

# `factmem data build/filter` select items only: max_tokens, filter and keep act in experiments.
SELECTION_KEYS = ("source", "n", "offset", "seed")


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    return experiment_from_dict(read_yaml(path), overrides, source=str(path))


def experiment_from_dict(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>"
) -> Experiment:
    raw = copy.deepcopy(raw)
    for text in overrides:
        try:
            apply_override(raw, *parse_override(text))
        except _Invalid as e:
            raise ConfigError(f"--set {text!r}: {e}") from None
    try:
        raw.setdefault("name", Path(source).stem if source != "<dict>" else "experiment")
        base = _parse_experiment(raw)  # validates the config as written
        variants: dict[str, ExperimentConfig] = {}
        for name, spec in expand_variants(base.variants).items():
            vraw = _variant_raw(raw, name, spec)
            try:
                variants[name] = _parse_experiment(vraw)
            except _Invalid as e:
                raise _Invalid(f"variants.{name}", str(e)) from None
        _check_variant_folders(list(variants))
        _check_variant_baselines(variants, base.baseline)
    except _Invalid as e:
        raise ConfigError(f"{source}: {e}") from None
    return Experiment(source, raw, variants)


def parse_set(raw: dict[str, Any], where: str = "set") -> SetConfig:
    """One set from a flat mapping (`{source: kvr, n: 10, length: 8}`), as the CLI builds it."""
    try:
        cfg = _parse_with_source_params(SetConfig, raw, "", SELECTION_KEYS)
        _check_selection(cfg.n, cfg.offset, "")
    except _Invalid as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _parse_experiment(raw: dict[str, Any], path: str = "") -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    sets_raw = raw.pop("sets", None)
    stages_raw = raw.pop("stages", None)
    if not isinstance(sets_raw, dict) or not sets_raw:
        raise _Invalid("sets",
                       "give at least one named set, e.g. sets: {kvr_a: {source: kvr, n: 32}}")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise _Invalid("stages", "give a list of at least one stage, e.g. [{name: s1, set: kvr_a}]")
    sets = _parse_sets(sets_raw)
    stages = _parse_stages(stages_raw, raw.get("train") or {})
    cfg = parse(ExperimentConfig, {**raw, "sets": {}, "stages": []}, path)
    cfg.sets, cfg.stages = sets, stages
    if not cfg.track:
        cfg.track = list(dict.fromkeys(x for s in stages for x in (s.set, *s.joint)))
    _check_names(cfg)
    _check_references(cfg)
    return cfg


def _parse_sets(sets_raw: dict[Any, Any]) -> dict[str, SetConfig]:
    sets = {str(k): _parse_with_source_params(SetConfig, v, f"sets.{k}")
            for k, v in sets_raw.items()}
    for name, s in sets.items():
        _check_selection(s.n, s.offset, f"sets.{name}")
    return sets


def _parse_stages(stages_raw: list[Any], train_raw: dict[str, Any]) -> list[StageConfig]:
    parse(TrainConfig, train_raw, "train")  # errors in the shared settings name `train.`
    stages = []
    for i, st in enumerate(stages_raw):
        p = f"stages.{i}"
        if not isinstance(st, dict):
            raise _Invalid(p, f"expected a mapping, got {st!r}")
        st = dict(st)
        mix = [_parse_with_source_params(MixConfig, m, f"{p}.mix.{j}")
               for j, m in enumerate(_as_list(st.pop("mix", []), f"{p}.mix"))]
        merged_train = _deep_merge(train_raw, st.pop("train", None) or {})
        stage = parse(StageConfig, {**st, "train": {}}, p)
        stage.mix = mix
        stage.train = parse(TrainConfig, merged_train, f"{p}.train")
        stages.append(stage)
    return stages
