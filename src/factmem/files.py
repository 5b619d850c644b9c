"""Atomic writes: files and directories are written under a temporary name and renamed, so a
crash never leaves a half-written file or directory behind. And `safe_name`: a name as one
directory name (the config checks and the run directory both ask it)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from factmem.errors import FactmemError


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    _atomic_write_text(Path(path), text)


def write_json(path: str | Path, obj: Any) -> None:
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    _atomic_write_text(Path(path), text)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def atomic_dir(path: Path, tmp: Path | None = None, *, main: bool = True,
               barrier: Callable[[], None] | None = None) -> Iterator[Path]:
    """Write a directory atomically: yields a fresh temporary sibling (`tmp`, by default
    `.NAME.tmpPID`) to write into, then replaces `path` with it. A failure leaves `path` as it
    was (the temporary directory is cleared by the next attempt).

    Collective writes (every process writes a part, e.g. its shards): only `main` creates and
    renames the directory, and `barrier` is called after creating it and after renaming it, so
    no process writes before it exists or reads before it is in place."""
    tmp = tmp or path.with_name(f".{path.name}.tmp{os.getpid()}")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier is not None:
        barrier()
    yield tmp
    if main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if barrier is not None:
        barrier()


def copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the directory `src` into `dst`, leaving out `src`'s top-level entries named in
    `skip`. Files are hard links where the file system allows (no disk space: nothing factmem
    writes is changed in place, only replaced), else copies."""
    def ignore(d: str, names: list[str]) -> list[str]:
        return [n for n in names if n in skip] if Path(d) == src else []

    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=ignore, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def safe_name(name: str) -> str:
    """A variant name as a single directory name. Names written in the config are plain
    already (factmem.config.checks) and come back unchanged; a grid-made name keeps `[`, `=`,
    `,` and has anything else outside letters and digits as `_` (the config checks refuse two
    variants that would so share a folder)."""
    out = "".join(c if c.isalnum() or c in "-_.=,[]" else "_" for c in name)
    if out in ("", ".", ".."):
        raise FactmemError(f"name {name!r} cannot be used as a directory name")
    return out
