"""Name -> source. A source is a seeded, deterministic producer of Examples.

Every source takes the same selection arguments (`n`, `offset`, `seed`) plus its own typed
parameters (a dataclass). Registering a name twice is an error, never a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from factmem.data.examples import Example, Kind
from factmem.errors import ConfigError, DataError

BuildFn = Callable[[Any, int | None, int, int], list[Example]]


@dataclass(frozen=True)
class SourceSpec:
    name: str
    build: BuildFn  # (params, n, offset, seed) -> examples
    params: type  # dataclass of source-specific parameters
    kind: Kind
    unbounded: bool  # synthetic pools (any index exists); bounded pools are files or corpora
    doc: str


SOURCES: dict[str, SourceSpec] = {}


def register_source(name: str, params: type, kind: Kind, unbounded: bool = False):
    def decorator(fn: BuildFn) -> BuildFn:
        if name in SOURCES:
            raise RuntimeError(f"source {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        SOURCES[name] = SourceSpec(name, fn, params, kind, unbounded, doc)
        return fn

    return decorator


def get_source(name: str) -> SourceSpec:
    if name not in SOURCES:
        import difflib

        near = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"unknown source {name!r}{hint}; valid sources: {', '.join(sorted(SOURCES))}"
        )
    return SOURCES[name]


def build_source(name: str, params: Any, n: int | None, offset: int, seed: int) -> list[Example]:
    spec = get_source(name)
    if spec.unbounded and n is None:
        raise ConfigError(f"source {name!r} has no end: give the number of items `n`")
    examples = spec.build(params, n, offset, seed)
    if not examples:
        raise DataError(f"source {name!r} (n={n}, offset={offset}) produced no examples")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"source {name!r} produced duplicate id {dup!r}")
    return examples


def select(items: list, n: int | None, offset: int, what: str) -> list:
    """items[offset : offset + n], refusing to silently return fewer than asked for."""
    if offset > len(items) or (n is not None and offset + n > len(items)):
        want = "all" if n is None else n
        raise DataError(
            f"{what} has {len(items)} items; cannot take n={want} from offset={offset}"
        )
    return items[offset:] if n is None else items[offset : offset + n]
