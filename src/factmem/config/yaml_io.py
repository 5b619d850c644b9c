"""Reading YAML: duplicate keys refused (naming both lines), YAML 1.2 booleans, aliases
bounded (a 1 KB "billion laughs" file expands to billions of values: every later step, from
the config comparison to an error quoting the value, would walk them all), and the `!replace`
tag (a mapping that replaces the section it is set on instead of merging into it).

Config files and `--set` values both go through `load_yaml_text`; `read_yaml` turns every
failure into a one-line ConfigError naming the file and, where known, the line and column.
`dump_yaml` writes a config back (the run directory's config.yaml), `!replace` included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from factmem.errors import ConfigError, quote

MAX_ALIAS_VALUES = 100_000  # values that aliases may add; a real config has a few hundred


class LoaderError(yaml.YAMLError):
    """A YAML text that parses but that factmem refuses; `line` is 1-based (None: unknown)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class DuplicateKeyError(LoaderError):
    """A mapping names the same key twice (plain YAML lets the last one silently win)."""

    def __init__(self, key: Any, first_line: int, line: int):
        where = f"lines {first_line} and {line}" if line != first_line else f"twice on line {line}"
        super().__init__(f"duplicate key {quote(key)} ({where}); keep one of them", line)
        self.key, self.first_line = key, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, naming both lines, and
    aliases that expand past MAX_ALIAS_VALUES values or refer to a value containing them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # nodes composed so far, aliases counted at their expanded size
        self._alias_values = 0  # of which aliases added
        self._sizes: dict[str, int] = {}  # anchor -> expanded size of its value
        self._open: set[str] = set()  # anchors whose value is being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1
            if event.anchor in self._open:
                raise LoaderError(f"alias *{event.anchor} refers to a value that contains it "
                                  "(a recursive value); write the value out", line)
            node = super().compose_node(parent, index)
            size = self._sizes.get(event.anchor, 1)
            self._values += size
            self._alias_values += size
            if self._alias_values > MAX_ALIAS_VALUES:
                raise LoaderError(f"aliases expand to more than {MAX_ALIAS_VALUES:,} values (at "
                                  f"alias *{event.anchor}); write the values out", line)
            return node
        start, anchor = self._values, event.anchor
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        self._values += 1
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = self._values - start
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # unhashable key: SafeLoader reports it below
                pass
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans: only true/false. YAML 1.1 (PyYAML's default) also reads on/off/yes/no as
# booleans, keys included, so `{kind: kl, on: mix}` became `{kind: kl, True: mix}`.
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class Replace(dict):
    """A mapping tagged `!replace`: overrides, variant keys and a stage's `train` merge into the
    section they are set on key by key; this one replaces it whole."""


def _construct_replace(loader: UniqueKeyLoader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, "!replace takes a mapping, e.g. !replace {lr: 1.0e-4}", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


UniqueKeyLoader.add_constructor("!replace", _construct_replace)


class _ConfigDumper(yaml.SafeDumper):
    """yaml.SafeDumper that writes a `Replace` mapping with its tag."""


_ConfigDumper.add_representer(
    Replace, lambda dumper, data: dumper.represent_mapping("!replace", dict(data)))


def dump_yaml(data: Any) -> str:
    """A config as YAML that `load_yaml_text` reads back the same, `!replace` included."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False)


def load_yaml_text(text: str) -> Any:
    """YAML -> Python with duplicate keys and alias bombs refused (config files and `--set`
    values)."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe
    except RecursionError:  # PyYAML composes recursively: ~300 levels of [[[...]]] exhaust it
        raise LoaderError("values nested too deeply") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = load_yaml_text(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except LoaderError as e:
        raise ConfigError(f"{path}{'' if e.line is None else f':{e.line}'}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw

