"""Data: examples, the source registry and the built-in sources.

Importing this package registers every built-in source (kvr, random-words, generic, jsonl,
the paper's public sets in public.py, entities)."""

from factmem.data import entities, generic, local, public, synthetic  # noqa: F401  (registration side effect)  # noqa: F401,E402  (the paper's sets, fictional entities)
from factmem.data.examples import Example
from factmem.data.registry import SOURCES, SourceSpec, build_source, get_source

__all__ = ["Example", "SOURCES", "SourceSpec", "build_source", "get_source"]
