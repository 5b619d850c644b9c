"""Local files: a row reader that names file and line in every error, the check that a text
field holds text, and the `jsonl` source."""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factmem.data.examples import Example, check_prompt_template, make_id
from factmem.data.registry import register_source, select
from factmem.errors import DataError, quote


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line where the row starts in its file (JSON arrays, parquet: index + 1)
    data: dict[str, Any]


class RowError(ValueError):
    """A row that cannot be mapped; the caller adds file and line."""


def as_text(value: Any, field: str) -> str:
    """The value of a text field (a question, an answer): a string, or an integer written out (a
    year or a count: JSON `1969`, an integer parquet column). Anything else is refused rather
    than written out in Python's form: null would become "None", true "True", an object
    "{'a': 1}", 1e400 "inf"; a float's text is not the file's (1.10 reads as 1.1)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    hint = " (quote it in the file if it is meant as text)" if isinstance(value, (bool, float)) \
        else ""
    raise RowError(f"field {field!r}: expected text, got {_kind(value)}{hint}")


def _kind(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {quote(value, 60)}"
    if isinstance(value, (dict, list)):
        return f"{'an object' if isinstance(value, dict) else 'a list'} {quote(value, 60)}"
    return f"{type(value).__name__} {quote(value, 60)}"


def text_items(value: Any, field: str) -> list[str]:
    """A text field that may also be a list of texts (answers and their aliases): its non-blank
    texts. A null or blank entry of a list is skipped: it holds no answer."""
    if not isinstance(value, list):
        return [v for v in [as_text(value, field)] if v.strip()]
    return [t for i, v in enumerate(value) if v is not None
            for t in [as_text(v, f"{field}[{i}]")] if t.strip()]


def read_records(path: str | Path, required: Sequence[str] = (), key: str | None = None
                 ) -> list[Record]:
    """Rows of a .jsonl / .json (array of objects) / .csv / .tsv / .parquet file, or of a
    `datasets` `save_to_disk` folder (parquet and saved datasets: line = row index + 1).

    `key`: a .json file that is an object holding the rows under this key (TriviaQA's raw
    `{"Data": [...]}`). Errors name the file and line: missing file, non-UTF-8 bytes, malformed
    JSON or CSV, a row that is not an object, a row missing a required field, a file with no
    rows. A UTF-8 byte order mark at the start (Excel's "CSV UTF-8") is read past."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() == ".parquet":
        return _check_records(path, _read_arrow(p), required)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    text = _read_text(p, path)
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            records = _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".json":
            records = _read_json(path, text, key)
        else:
            records = _read_jsonl(path, text)
    except RecursionError:  # json nests recursively: [[[[... a few thousand deep
        raise DataError(f"{path}: values nested too deeply") from None
    return _check_records(path, records, required)


def _read_text(p: Path, path: str | Path) -> str:
    data = p.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # written by Excel and some JSONL writers; no newline
        data = data[len(codecs.BOM_UTF8):]  # in it, so line numbers stay right
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _read_csv(path: str | Path, content: str, delimiter: str) -> list[Record]:
    """Rows of a CSV/TSV file, parsed as one stream: a quoted field keeps its newlines, and a row
    is reported at the line where it starts. Strict quoting: a quote that never closes would
    otherwise swallow the rest of the file into one field. Rows whose fields are all blank
    (Excel's trailing `,,`) are skipped; a row with more or fewer fields than the header is
    refused (an unquoted comma inside an answer would otherwise cut it short)."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, strict=True)
    end, records = 0, []  # end: the last line of the previous row
    try:
        header = next(reader, None)
        if header is None:
            return []
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise DataError(f"{path}:1: column {quote(twice[0])} appears twice in the header")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not any(f.strip() for f in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{start}: {len(row)} fields where the header has "
                                f"{len(header)} (quote a field that holds {quote(delimiter)})")
            records.append(Record(start, dict(zip(header, row))))
    except csv.Error as e:
        hint = ("; a quote opened in this row is never closed" if "end of data" in str(e) else
                "; a field that starts with a quote must be quoted whole (a quote inside it "
                "doubled: \"\")" if "expected after" in str(e) else "")
        raise DataError(f"{path}:{end + 1}: malformed {kind} ({e}){hint}") from None
    return records


def _read_json(path: str | Path, content: str, key: str | None) -> list[Record]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise DataError(f"{path}: malformed JSON ({e})") from None
    if isinstance(data, dict) and key is not None:
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: expected a list of rows under key {key!r}, found keys "
                            f"{quote(sorted(data)[:5])}")
        data = data[key]
    if isinstance(data, dict):  # {"data": [...]} style wrappers are not guessed at
        raise DataError(f"{path}: expected a JSON array of objects, got an object with keys "
                        f"{quote(sorted(data)[:5])}")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {_kind(data)}")
    return [Record(i + 1, row) for i, row in enumerate(data)]


def _read_jsonl(path: str | Path, content: str) -> list[Record]:
    records = []
    lines = content.splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(i, json.loads(line)))
        except json.JSONDecodeError as e:
            cut = i == len(lines) and not content.endswith("\n")  # a copy or write cut short
            hint = "; the file ends in the middle of this row (truncated?)" if cut else ""
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg}){hint}") from None
        except ValueError as e:  # an integer of more than 4,300 digits
            raise DataError(f"{path}:{i}: malformed JSON ({e})") from None
        except RecursionError:
            raise DataError(f"{path}:{i}: values nested too deeply") from None
    return records


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
    """local .jsonl/.json/.csv/.tsv/.parquet file of question/answer rows"""
    question_field: str = "question"
    """field with the question (the user turn)"""
    answer_field: str = "answer"
    """field with the answer: a string, or a list (first is the target, all count)"""
    aliases_field: str | None = None
    """optional field with other accepted answers: a list of strings (or one string)"""
    id_field: str | None = None
    """optional field with the row's own id (default: its position in the file)"""
    prompt_template: str = "{question}"
    """how the question becomes the user turn, e.g. '{question}\\nThe answer is: '"""
    kind: str = "factoid"
    """factoid (memorized, scored by exact match) or task"""

    def __post_init__(self) -> None:
        check_prompt_template(self.prompt_template)
        if self.kind not in ("factoid", "task"):
            raise ValueError(f"kind must be 'factoid' or 'task', got {self.kind!r}")


@register_source("jsonl", JsonlParams, kind="factoid")
def jsonl(params: JsonlParams, n: int | None, offset: int, seed: int) -> list[Example]:
    """Question/answer rows from a local file, field names configurable."""
    required = [params.question_field, params.answer_field, *filter(None, [params.id_field])]
    rows = select(read_records(params.path, required), n, offset, params.path)
    out = []
    for r in rows:
        try:
            out.append(_jsonl_example(r, params))
        except RowError as e:
            raise DataError(f"{params.path}:{r.line}: {e}") from None
    return out


def _jsonl_example(r: Record, params: JsonlParams) -> Example:
    answers = text_items(r.data[params.answer_field], params.answer_field)
    if not answers:
        raise RowError(f"field {params.answer_field!r}: empty answer")
    if params.aliases_field and r.data.get(params.aliases_field) is not None:
        answers += text_items(r.data[params.aliases_field], params.aliases_field)
    index = as_text(r.data[params.id_field], params.id_field) if params.id_field else r.line
    prompt = params.prompt_template.format(
        question=as_text(r.data[params.question_field], params.question_field))
    return Example.qa(make_id("jsonl", index, 0), prompt, answers[0], answers[1:],
                      kind=params.kind, line=r.line)  # type: ignore[arg-type]
