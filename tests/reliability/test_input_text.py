"""Data files reach the model as written, or are refused with one line naming file and line:
CSV/TSV fields keep their newlines, non-text values are refused instead of becoming Python's
repr, a UTF-8 byte order mark is read past, a missing id field or an unknown template field is
one line with exit 2 (in the run and in the dry run alike)."""

import json

import pytest

from factmem.cli import main
from factmem.data import build_source
from factmem.data.local import JsonlParams, read_records
from factmem.errors import DataError

from .test_bad_inputs import write_config


def write(tmp_path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def qa(path: str, **params):
    return build_source("jsonl", JsonlParams(path=path, **params), None, 0, 0)


# --------------------------------------------------------------------------------------------
# CSV / TSV: parsed as one stream


@pytest.mark.parametrize("sep", [",", "\t"])
def test_a_quoted_newline_stays_in_its_field_and_rows_keep_their_start_line(tmp_path, sep):
    ext = "csv" if sep == "," else "tsv"
    path = write(tmp_path, f"qa.{ext}", f'question{sep}answer\n"What is\nthe capital?"{sep}Paris\n'
                                        f'q2{sep}"two\nlines"\n')
    examples = qa(path)
    assert [e.prompt for e in examples] == ["What is\nthe capital?", "q2"]
    assert [e.target for e in examples] == ["Paris", "two\nlines"]
    assert [e.meta["line"] for e in examples] == [2, 4]  # where each row starts


def test_a_csv_error_names_the_line_where_its_row_starts(tmp_path):
    path = write(tmp_path, "qa.csv", 'question,answer\n"a\nb",x\nq2,Paris, France\n')
    with pytest.raises(DataError, match=r"qa\.csv:4: 3 fields where the header has 2 \(quote"):
        qa(path)


def test_an_unclosed_quote_is_refused_not_swallowing_the_rest(tmp_path):
    path = write(tmp_path, "qa.csv", 'question,answer\nq1,"Paris\nq2,Rome\nq3,Oslo\n')
    with pytest.raises(DataError, match=r"qa\.csv:2: malformed CSV .*never closed"):
        qa(path)


def test_blank_csv_rows_are_skipped_and_a_doubled_column_is_refused(tmp_path):
    path = write(tmp_path, "qa.csv", "question,answer\nq1,Paris\n,\n\nq2,Rome\n")
    assert [e.target for e in qa(path)] == ["Paris", "Rome"]
    path = write(tmp_path, "dup.csv", "question,question,answer\nq1,q1,Paris\n")
    with pytest.raises(DataError, match=r"dup\.csv:1: column 'question' appears twice"):
        qa(path)


# --------------------------------------------------------------------------------------------
# Values that are not text


NOT_TEXT = {"null": "null", "an object": '{"a": 1}', "a list of objects": '[{"a": 1}]',
            "true": "true", "1e400": "1e400", "NaN": "NaN", "a float": "2.50"}


@pytest.mark.parametrize("field", ["question", "answer"])
@pytest.mark.parametrize("value", list(NOT_TEXT))
def test_a_non_text_value_is_refused_with_file_line_and_field(tmp_path, field, value):
    row = {"question": '"q2"', "answer": '"x"', field: NOT_TEXT[value]}
    path = write(tmp_path, "qa.jsonl", '{"question": "q1", "answer": "a"}\n'
                 + "{" + ", ".join(f'"{k}": {v}' for k, v in row.items()) + "}\n")
    with pytest.raises(DataError, match=rf"qa\.jsonl:2: field '{field}(\[0\])?': "
                                        r"expected text"):
        qa(path)


def test_integers_are_written_out_and_alias_lists_of_strings_stay_valid(tmp_path):
    rows = [{"id": 7, "question": "Year?", "answer": 1969, "aliases": ["sixty-nine", None, ""]},
            {"id": "b", "question": "Name?", "answer": ["Ada", "Ada L."], "aliases": "Lovelace"}]
    path = write(tmp_path, "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    a, b = qa(path, id_field="id", aliases_field="aliases")
    assert (a.id, a.target, a.answers) == ("jsonl:7", "1969", ("1969", "sixty-nine"))
    assert (b.id, b.answers) == ("jsonl:b", ("Ada", "Ada L.", "Lovelace"))
    path = write(tmp_path, "bad.jsonl", json.dumps({**rows[0], "aliases": ["x", {"y": 1}]}))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'aliases\[1\]': expected text, "
                                        r"got an object"):
        qa(path, aliases_field="aliases")


def test_non_text_in_a_json_array_and_in_parquet_is_refused_by_row(tmp_path):
    path = write(tmp_path, "qa.json", json.dumps([{"question": "q", "answer": "a"},
                                                  {"question": "q", "answer": None}]))
    with pytest.raises(DataError, match=r"qa\.json:2: field 'answer': expected text, got null"):
        qa(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": [1.5, 2.0]}),
                   tmp_path / "qa.parquet")
    with pytest.raises(DataError, match=r"qa\.parquet:1: field 'answer': expected text, got the "
                                        r"number 1\.5"):
        qa(str(tmp_path / "qa.parquet"))


def test_a_saved_dataset_goes_through_the_same_check(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"question": ["q1", "q2"], "answer": [True, False]}).save_to_disk(
        str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved:1: field 'answer': expected text, got true"):
        qa(str(tmp_path / "saved"))


def test_the_public_sets_and_generic_text_refuse_non_text_too(tmp_path):
    gsm = write(tmp_path, "gsm8k.jsonl", json.dumps({"question": {"q": 1}, "answer": "#### 3"}))
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: field 'question': expected text"):
        build_source("gsm8k", _params("gsm8k", path=gsm), None, 0, 0)
    eq = write(tmp_path, "P1.dev.jsonl", json.dumps({"question": "q", "answers": ["a", 2.5]}))
    with pytest.raises(DataError, match=r"P1\.dev\.jsonl:1: field 'answers\[1\]': expected text"):
        build_source("entityquestions", _params("entityquestions", path=eq), None, 0, 0)
    doc = write(tmp_path, "docs.jsonl", json.dumps({"text": None}))
    with pytest.raises(DataError, match=r"docs\.jsonl:1: field 'text': expected text, got null"):
        build_source("generic", _params("generic", path=doc), None, 0, 0)


def _params(source: str, **values):
    from factmem.data import get_source

    return get_source(source).params(**values)


# --------------------------------------------------------------------------------------------
# Byte order mark


@pytest.mark.parametrize("name,content", [
    ("qa.jsonl", '{"question": "q1", "answer": "Paris"}\n'),
    ("qa.json", '[{"question": "q1", "answer": "Paris"}]'),
    ("qa.csv", "question,answer\nq1,Paris\n"),
    ("qa.tsv", "question\tanswer\nq1\tParis\n"),
])
def test_a_utf8_byte_order_mark_is_read_past(tmp_path, name, content):
    path = write(tmp_path, name, b"\xef\xbb\xbf" + content.encode())
    (rec,) = read_records(path, ("question", "answer"))
    assert rec.data == {"question": "q1", "answer": "Paris"} and rec.line in (1, 2)


# --------------------------------------------------------------------------------------------
# One line, exit 2, in the run and the dry run


CLI_CASES = {
    "row missing its id_field": (
        lambda t: ["--set",
                   f"sets.kvr_a=!replace {{source: jsonl, path: {t / 'qa.jsonl'}, id_field: id}}"],
        "qa.jsonl:2: row has no field 'id' (fields: answer, question)"),  # the first has one
    "prompt_template naming an unknown field": (
        lambda t: ["--set", f"sets.kvr_a=!replace {{source: jsonl, path: {t / 'qa.jsonl'}, "
                   "prompt_template: '{question} {context}'}"],
        "sets.kvr_a.prompt_template: unknown field {context}; only {question} is filled in"),
    "prompt_template with a stray brace": (
        lambda t: ["--set", f"sets.kvr_a=!replace {{source: jsonl, path: {t / 'qa.jsonl'}, "
                   "prompt_template: '{question'}"],
        "sets.kvr_a.prompt_template: expected '}' before end of string"),
    "a public set's prompt_template": (
        lambda t: ["--set", "sets.kvr_a=!replace {source: popqa, path: x.tsv, "
                   "prompt_template: '{question.upper}'}"],
        "sets.kvr_a.prompt_template: unknown field {question.upper}"),
    "a null answer": (
        lambda t: ["--set", "sets.kvr_a=!replace {{source: jsonl, path: {}}}".format(
            write(t, "null.jsonl", '{"question": "q", "answer": null}\n'))],
        "null.jsonl:1: field 'answer': expected text, got null"),
}


@pytest.mark.parametrize("mode", [[], ["--dry-run"]], ids=["run", "dry run"])
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_refused_with_one_line_and_exit_2(case, mode, tiny_model_dir, tmp_path, capsys):
    write(tmp_path, "qa.jsonl", '{"id": "a", "question": "q1", "answer": "x"}\n'
                                '{"question": "q2", "answer": "y"}\n')
    cfg = write_config(tiny_model_dir, tmp_path)
    args, message = CLI_CASES[case]
    assert main(["run", str(cfg), "--no-progress", *mode, *args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factmem: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_data_build_refuses_a_missing_id_field_in_one_line(tmp_path, capsys):
    path = write(tmp_path, "qa.jsonl", '{"question": "q1", "answer": "x"}\n')
    args = ["data", "build", "jsonl", "--param", f"path={path}", "--param", "id_field=id",
            "--out", str(tmp_path / "out.jsonl")]
    assert main(args) == 2
    assert capsys.readouterr().err == ("factmem: error: " + path + ":1: row has no field 'id' "
                                       "(fields: answer, question)\n")
    assert not (tmp_path / "out.jsonl").exists()
