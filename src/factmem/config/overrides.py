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

from factmem.config.checks import _check_name
from factmem.config.coerce import _Invalid, _unknown_ref
from factmem.config.schema import ExperimentConfig
from factmem.config.yaml_io import LoaderError, Replace, load_yaml_text
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
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
    key, value = text.split("=", 1)
    try:
        return key.strip(), load_yaml_text(value) if value.strip() else None
    except LoaderError as e:
        raise ConfigError(f"--set {text!r}: {e}") from None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in the raw config. A mapping merges into the mapping already there, key by
    key at every level; a `!replace` mapping (`Replace`), a list or a scalar replaces what was
    there. List items are addressed by index or, for stages, by name (`stages.stage2.mix`).
    Keys under `variants.NAME` are overrides of that variant (`_override_variant`)."""
    parts = _key_parts(dotted)
    if parts[0] == "variants":
        _override_variants(raw, parts[1:], value)
        return
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise _Invalid(".".join(parts[:depth]), f"cannot set a key inside {node!r}")
    last, where = parts[-1], ".".join(parts)
    if isinstance(node, list):
        idx = _list_index(node, last, where)
        node[idx] = _merge(node[idx], value, where)
    elif isinstance(node, dict):
        node[last] = _merge(node.get(last), value, where)
    else:
        raise _Invalid(".".join(parts[:-1]), f"cannot set a key inside {node!r}")


def _key_parts(dotted: Any) -> list[str]:
    if not isinstance(dotted, str) or not dotted:
        raise _Invalid("", f"override keys are dotted names (e.g. train.lr), got {dotted!r}")
    parts = dotted.split(".")
    if not all(parts):
        raise _Invalid(dotted, "empty part in a dotted key")
    return parts


def _merge(old: Any, new: Any, where: str) -> Any:
    """`new` set where `old` was: a mapping merges into a mapping key by key, at every level;
    anything else (a `Replace` mapping, a list, a scalar) replaces it. Merging an empty mapping
    into a full one would change nothing: refused, as it reads like "empty this"."""
    if not _merges(old, new):
        return copy.deepcopy(new)
    if not new and old:
        raise _Invalid(where, f"an empty mapping changes nothing here (it holds "
                       f"{', '.join(map(str, old))}); to empty it, write {where}=!replace {{}}")
    out = copy.copy(old)  # a Replace stays one: it still replaces what it is merged over
    for k, v in new.items():
        out[k] = _merge(old.get(k), v, f"{where}.{k}")
    return out


def _merges(old: Any, new: Any) -> bool:
    return isinstance(old, dict) and isinstance(new, dict) and not isinstance(new, Replace)


def _deep_merge(base: Any, over: Any) -> Any:
    """A stage's `train` over the top-level one: key by key, unless marked `!replace`."""
    if _merges(base, over):
        return {**base, **{k: _deep_merge(base.get(k), v) for k, v in over.items()}}
    return copy.deepcopy(dict(over) if isinstance(over, Replace) else over)


# --------------------------------------------------------------------------------------------
# Overrides of variants


def _override_variants(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    """`variants=...` merges variant by variant (a variant's overrides key by key);
    `variants.NAME...` changes one variant."""
    variants = raw.get("variants")
    if not parts:
        if not _merges(variants, value):
            raw["variants"] = copy.deepcopy(value)
            return
        if not value and variants:
            raise _Invalid("variants", f"an empty mapping changes nothing here (it holds "
                           f"{', '.join(map(str, variants))}); to remove every variant, write "
                           "variants=!replace {}")
        for name, spec in value.items():
            _override_variant(variants, name, [], spec)
        return
    if variants is None:
        variants = raw["variants"] = {}
    if not isinstance(variants, dict):
        raise _Invalid("variants", f"expected a mapping of variants, got {variants!r}")
    _override_variant(variants, parts[0], parts[1:], value)


def _override_variant(variants: dict[str, Any], name: Any, rest: list[str], value: Any) -> None:
    """`variants.NAME.KEY=VALUE` adds the override `KEY: VALUE` to variant NAME, after its own
    overrides (so the command line wins; one of the same KEY is replaced); under `grid` it adds
    a grid key. `variants.NAME=MAPPING` adds every key of MAPPING so (`!replace`: replaces
    them all)."""
    where = f"variants.{name}"
    spec = variants.get(name)
    if not rest and not _merges(spec, value):
        variants[name] = copy.deepcopy(value)
        return
    if spec is None:
        spec = variants[name] = {}
    if not isinstance(spec, dict):
        raise _Invalid(where, f"expected a mapping of overrides, got {spec!r}")
    if rest:
        _add_override(spec, ".".join(rest), value, where)
        return
    if not value and spec:
        raise _Invalid(where, "an empty mapping changes nothing here; to drop the variant's "
                       f"overrides, write {where}=!replace {{}}")
    for key, v in value.items():
        _add_override(spec, key, v, where)


def _add_override(spec: dict[str, Any], key: Any, value: Any, where: str) -> None:
    """One override into a variant's spec, after the others (so it wins); a grid key
    (`grid.train.lr`, or each key of a `grid` mapping) into its grid the same way."""
    if isinstance(key, str) and key.startswith("grid."):
        if spec.get("grid") is None:
            spec["grid"] = {}
        if not isinstance(spec["grid"], dict):
            raise _Invalid(f"{where}.grid", "expected {dotted.key: [value, ...]}")
        _append(spec["grid"], key[len("grid."):], value)
    elif key == "grid" and _merges(spec.get("grid"), value):
        for k, v in value.items():
            _append(spec["grid"], k, v)
    else:
        _append(spec, key, value)


def _append(mapping: dict[Any, Any], key: Any, value: Any) -> None:
    """Set `key` as the last entry of `mapping` (overrides apply in order: the last wins)."""
    mapping.pop(key, None)
    mapping[key] = copy.deepcopy(value)


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
    """{name: overrides}; a `grid` entry expands into one variant per combination, named
    `NAME[key=value,...]` (the last part of each key). Names are checked as file names (a
    variant is a folder); two combinations that make the same name are refused."""
    if not variants:
        return {"default": {}}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in variants.items():
        name = str(name)
        _check_name(name, "variants")
        spec = _variant_spec(spec, f"variants.{name}")
        grid = spec.pop("grid", None)
        if grid is None:
            out[name] = spec
            continue
        keys = _grid_keys(grid, f"variants.{name}.grid")
        for combo in itertools.product(*(grid[k] for k in keys)):
            label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
            full = f"{name}[{label}]"
            if full in out:
                raise _Invalid(f"variants.{name}.grid", f"two combinations make the same "
                               f"variant {full!r}; give values that differ as text")
            out[full] = {**spec, **dict(zip(keys, combo))}
    return out


def _variant_spec(spec: Any, where: str) -> dict[str, Any]:
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise _Invalid(where, f"expected a mapping of overrides (dotted.key: value), got {spec!r}")
    for key in spec:
        if key != "grid":
            try:
                _key_parts(key)
            except _Invalid as e:
                raise _Invalid(where, str(e)) from None
    return dict(spec)


def _grid_keys(grid: Any, where: str) -> list[str]:
    if not (isinstance(grid, dict) and grid
            and all(isinstance(k, str) and k and all(k.split(".")) for k in grid)
            and all(isinstance(v, list) and v for v in grid.values())):
        raise _Invalid(where, "expected {dotted.key: [value, ...]}")
    return list(grid)


def _variant_raw(raw: dict[str, Any], name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config with variant `name`'s overrides applied."""
    vraw = copy.deepcopy(raw)
    for key, value in spec.items():
        try:
            apply_override(vraw, key, value)
        except _Invalid as e:
            raise _Invalid(f"variants.{name}", str(e)) from None
    return vraw
