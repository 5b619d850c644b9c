"""Local files: a row reader that names file and line in every error, and the `jsonl` source."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factmem.data.examples import Example, make_id
from factmem.data.registry import register_source, select
from factmem.errors import DataError


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line of the row in its file (JSON arrays: the row's index + 1)
    data: dict[str, Any]


def read_records(path: str | Path, required: Sequence[str] = (), key: str | None = None
                 ) -> list[Record]:
    """Rows of a .jsonl / .json (array of objects) / .csv / .tsv / .parquet file, or of a
    `datasets` `save_to_disk` folder (parquet and saved datasets: line = row index + 1).

    `key`: a .json file that is an object holding the rows under this key (TriviaQA's raw
    `{"Data": [...]}`). Errors name the file and line: missing file, non-UTF-8 bytes, malformed
    JSON, a row that is not an object, a row missing a required field, a file with no rows."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() == ".parquet":
        return _check_records(path, _read_arrow(p), required)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        records = [Record(i + 2, dict(row)) for i, row in enumerate(reader)]  # header is line 1
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and key is not None:
            if not isinstance(data.get(key), list):
                raise DataError(f"{path}: expected a list of rows under key {key!r}, found keys "
                                f"{sorted(data)[:5]}")
            data = data[key]
        if isinstance(data, dict):  # {"data": [...]} style wrappers are not guessed at
            raise DataError(f"{path}: expected a JSON array of objects, got an object with keys "
                            f"{sorted(data)[:5]}")
        records = [Record(i + 1, row) for i, row in enumerate(data)]
    else:
        records = []
        lines = text.splitlines()
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(i, json.loads(line)))
            except json.JSONDecodeError as e:
                cut = i == len(lines) and not text.endswith("\n")  # a copy or write cut short
                hint = "; the file ends in the middle of this row (truncated?)" if cut else ""
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg}){hint}") from None
    return _check_records(path, records, required)


def _read_arrow(p: Path) -> list[Record]:
    """A parquet file or a `Dataset.save_to_disk` folder (a DatasetDict folder: give the split's
    subfolder)."""
    if p.is_dir():
        if not (p / "dataset_info.json").is_file() and not (p / "state.json").is_file():
            subs = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
            hint = f"; it holds the splits {subs}: give one of them" if subs else ""
            raise DataError(f"{p}: a directory, neither a data file (.jsonl, .json, .csv, .tsv, "
                            f".parquet) nor a `save_to_disk` dataset folder{hint}")
        from datasets import load_from_disk

        try:
            rows = load_from_disk(str(p)).to_list()
        except Exception as e:  # corrupt arrow files, version mismatches: one line, with the path
            raise DataError(f"{p}: cannot load the saved dataset ({e})") from None
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:
            raise DataError(f"{p}: cannot read parquet ({e})") from None
    return [Record(i + 1, row) for i, row in enumerate(rows)]


def _check_records(path: str | Path, records: list[Record], required: Sequence[str]
                   ) -> list[Record]:
    for r in records:
        if not isinstance(r.data, dict):
            raise DataError(f"{path}:{r.line}: expected an object, got {type(r.data).__name__}")
        for field in required:
            if field not in r.data:
                raise DataError(f"{path}:{r.line}: row has no field {field!r} "
                                f"(fields: {', '.join(sorted(r.data))})")
    if not records:
        raise DataError(f"{path}: no rows")
    return records


@dataclass
class JsonlParams:
    path: str
    """local .jsonl/.json/.csv/.tsv file of question/answer rows"""
    question_field: str = "question"
    """field with the question (the user turn)"""
    answer_field: str = "answer"
    """field with the answer: a string, or a list (first is the target, all count)"""
    aliases_field: str | None = None
    """optional field with a list of other accepted answers"""
    id_field: str | None = None
    """optional field with the row's own id (default: its position in the file)"""
    prompt_template: str = "{question}"
    """how the question becomes the user turn, e.g. '{question}\\nThe answer is: '"""
    kind: str = "factoid"
    """factoid (memorized, scored by exact match) or task"""

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {question}")
        if self.kind not in ("factoid", "task"):
            raise ValueError(f"kind must be 'factoid' or 'task', got {self.kind!r}")


def _answers(value: Any, where: str) -> list[str]:
    vals = value if isinstance(value, list) else [value]
    vals = [str(v) for v in vals if v is not None and str(v).strip()]
    if not vals:
        raise DataError(f"{where}: empty answer")
    return vals


@register_source("jsonl", JsonlParams, kind="factoid")
def jsonl(params: JsonlParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """Question/answer rows from a local file, field names configurable."""
    required = [params.question_field, params.answer_field]
    rows = select(read_records(params.path, required), n, offset, params.path)
    out = []
    for r in rows:
        where = f"{params.path}:{r.line}: field {params.answer_field!r}"
        answers = _answers(r.data[params.answer_field], where)
        if params.aliases_field and r.data.get(params.aliases_field):
            answers += _answers(r.data[params.aliases_field], where)
        index = r.data[params.id_field] if params.id_field else r.line
        prompt = params.prompt_template.format(question=r.data[params.question_field])
        out.append(Example.qa(make_id("jsonl", index, 0), prompt, answers[0], answers[1:],
                              kind=params.kind, line=r.line))  # type: ignore[arg-type]
    return out
