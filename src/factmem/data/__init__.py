"""Data: examples, the source registry and the built-in sources.

Importing this package registers every built-in source (kvr, random-words, generic, jsonl)."""

from factmem.data import generic, local, synthetic  # noqa: F401  (registration side effect)
from factmem.data.examples import Example
from factmem.data.registry import SOURCES, SourceSpec, build_source, get_source

__all__ = ["Example", "SOURCES", "SourceSpec", "build_source", "get_source"]
