"""Changes to the raw YAML before it is parsed: dotted `--set` overrides, variants and their
grids, the merge of a stage's `train` over the top-level one, and `Experiment`, the config with
its resolved variants.

Variants are dotted overrides of the raw YAML, applied before parsing, so `train.lr` in a variant
reaches every stage and a variant can change anything a config can say.

Why not OmegaConf's dotlist overrides and merge: stages are a list addressed by name
(`stages.stage2.mix`), which OmegaConf's keys cannot say, an unknown list item must be answered
with the nearest name, and OmegaConf's YAML loading would lose the duplicate-key and YAML 1.2
boolean handling of `yaml_io.py`. The code below is ~100 lines.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import yaml

from factmem.config.coerce import _Invalid, _unknown_ref
from factmem.config.schema import ExperimentConfig
from factmem.config.yaml_io import LoaderError, load_yaml_text
from factmem.errors import ConfigError


@dataclass
class Experiment:
    """A whole experiment: the raw config and its resolved variants."""

    source: str  # where the config came from (file path or "<dict>")
    raw: dict[str, Any]
    variants: dict[str, ExperimentConfig]

    @property
    def name(self) -> str:
        return self.first_variant.name

    @property
    def first_variant(self) -> ExperimentConfig:
        """The first variant as written: what the variants share (model, seeds, output)."""
        return next(iter(self.variants.values()))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-5` -> ("train.lr", 1e-05); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
    key, value = text.split("=", 1)
    try:
        return key.strip(), load_yaml_text(value) if value.strip() else None
    except LoaderError as e:
        raise ConfigError(f"--set {text!r}: {e}") from None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in the raw config. List items are addressed by index or, for stages, by
    name (`stages.stage2.mix`)."""
    parts = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
                return
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise _Invalid(where, f"cannot set a key inside {node!r}")


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise _Invalid(where, f"index out of range (the list has {len(node)} items)")
        return idx
    names = [item.get("name") for item in node if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise _unknown_ref(where, part, [n for n in names if n], "list item")


def expand_variants(variants: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: overrides}; a `grid` entry expands into one variant per combination."""
    if not variants:
        return {"default": {}}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in variants.items():
        spec = dict(spec or {})
        if not isinstance(spec, dict):
            raise _Invalid(f"variants.{name}", "expected a mapping of dotted overrides")
        grid = spec.pop("grid", None)
        if grid is None:
            out[str(name)] = spec
            continue
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise _Invalid(f"variants.{name}.grid", "expected {dotted.key: [value, ...]}")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
            out[f"{name}[{label}]"] = {**spec, **dict(zip(keys, combo))}
    return out


def _variant_raw(raw: dict[str, Any], name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config with variant `name`'s overrides applied."""
    vraw = copy.deepcopy(raw)
    for key, value in spec.items():
        try:
            apply_override(vraw, key, value)
        except _Invalid as e:
            raise _Invalid(f"variants.{name}", str(e)) from None
    return vraw


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base.get(k), v) if k in base else v
        return out
    return copy.deepcopy(over)
