"""Typed experiment configuration: YAML -> dataclasses, dotted overrides, variants, validation.

Every field carries a docstring (the string literal under it). The package is split by idea:

- `schema`: the dataclasses, each checking its own fields
- `yaml_io`: reading YAML (duplicate keys refused, YAML 1.2 booleans)
- `coerce`: plain data <-> dataclasses, errors naming the key path and the nearest valid key
- `overrides`: dotted `--set` overrides, variants and grids, `Experiment`
- `checks`: checks across sections (references, amounts, baselines)
- `load`: a raw config or file -> `Experiment`

This module is the public surface: import from `factmem.config`, not from its modules.
"""

from factmem.config.coerce import _coerce, _Invalid, _parse_with_source_params, parse, to_dict
from factmem.config.load import experiment_from_dict, load_experiment, parse_set
from factmem.config.overrides import Experiment, parse_override
from factmem.config.schema import (
    EvalConfig,
    ExperimentConfig,
    FreezeConfig,
    LoraConfig,
    MixConfig,
    ModelConfig,
    OutputConfig,
    RegularizerConfig,
    ReplayConfig,
    SetConfig,
    StageConfig,
    StopConfig,
    TrainConfig,
)
from factmem.config.yaml_io import Replace, dump_yaml

__all__ = [
    "EvalConfig",
    "Experiment",
    "ExperimentConfig",
    "FreezeConfig",
    "LoraConfig",
    "MixConfig",
    "ModelConfig",
    "OutputConfig",
    "RegularizerConfig",
    "Replace",
    "ReplayConfig",
    "SetConfig",
    "StageConfig",
    "StopConfig",
    "TrainConfig",
    "_Invalid",  # private: imported by tests of the coercion itself
    "_coerce",
    "_parse_with_source_params",
    "dump_yaml",
    "experiment_from_dict",
    "load_experiment",
    "parse",
    "parse_override",
    "parse_set",
    "to_dict",
]
