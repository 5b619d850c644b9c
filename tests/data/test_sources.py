"""Sources: seeded, stable ids, the paper's formats, errors that name file and line."""

import json
import re

import pytest

from factmem.data import SOURCES, build_source
from factmem.data.generic import GenericParams
from factmem.data.local import JsonlParams
from factmem.data.synthetic import KVRParams, RandomWordsParams, word_list
from factmem.errors import DataError


def test_registry_has_the_foundation_sources():
    assert {"kvr", "random-words", "generic", "jsonl"} <= set(SOURCES)


def test_duplicate_registration_is_an_error():
    from factmem.data.registry import register_source

    with pytest.raises(RuntimeError, match="twice"):
        register_source("kvr", KVRParams, kind="factoid")(lambda *a: [])


def test_kvr_format_ids_and_disjoint_offsets():
    a = build_source("kvr", KVRParams(), 50, 0, 0)
    b = build_source("kvr", KVRParams(), 50, 2000, 0)
    assert [e.id for e in a[:2]] == ["kvr:0", "kvr:1"] and b[0].id == "kvr:2000"
    for e in a + b:
        key, value = e.meta["key"], e.meta["value"]
        assert re.fullmatch(r"[a-z0-9]{8}", key) and re.fullmatch(r"[a-z0-9]{8}", value)
        assert e.prompt == f"The value of key {key} is?" and e.target == value
    keys = [e.meta["key"] for e in a + b]
    assert len(set(keys)) == len(keys)
    # item i is the same whatever n and offset select it
    assert build_source("kvr", KVRParams(), 10, 45, 0)[:5] == a[45:50]
    assert build_source("kvr", KVRParams(), 5, 0, 1)[0].id == "kvr@1:0"
    assert build_source("kvr", KVRParams(), 5, 0, 1)[0].target != a[0].target


def test_random_words_are_dictionary_words_of_the_given_length():
    ex = build_source("random-words", RandomWordsParams(length=12), 3, 0, 7)
    words = set(word_list())
    assert len(words) > 100_000
    for e in ex:
        shown = e.prompt.removeprefix("Memorize the following random-string passage: ").split()
        assert len(shown) == 6 and len(e.target.split()) == 6
        assert set(shown + e.target.split()) <= words
    assert ex == build_source("random-words", RandomWordsParams(length=12), 3, 0, 7)
    assert ex != build_source("random-words", RandomWordsParams(length=12), 3, 0, 8)


def test_generic_builtin_corpus_is_passage_completion_of_real_prose():
    ex = build_source("generic", GenericParams(), 300, 0, 0)  # the pool holds ~370
    for e in ex[:20]:
        assert e.prompt.startswith("Complete the following partial passage:\n\n")
        shown = e.prompt.split("\n\n", 1)[1].split()
        assert len(shown) == 50 and len(e.target.split()) == 50
    assert len({e.id for e in ex}) == 300
    with pytest.raises(DataError, match="cannot take n=5000"):
        build_source("generic", GenericParams(), 5000, 0, 0)


def test_generic_from_a_real_c4_file(shared_data):
    path = shared_data / "generic" / "c4-sample.01.jsonl"
    ex = build_source("generic", GenericParams(path=str(path)), None, 0, 0)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    long_docs = [d for d in docs if len(d["text"].split()) >= 100]
    assert len(ex) == len(long_docs) > 0  # one passage per document of 100+ words
    first = sorted(ex, key=lambda e: int(e.meta["doc"].split("#")[0]))[0]
    assert first.target.split() == long_docs[0]["text"].split()[50:100]


def test_jsonl_source_fields_and_aliases(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"q": "Capital of France?", "a": ["Paris", "paris, france"]}\n'
                 '{"q": "2+2?", "a": "4"}\n')
    ex = build_source("jsonl", JsonlParams(path=str(p), question_field="q", answer_field="a",
                                           prompt_template="{question}\nThe answer is: "),
                      None, 0, 0)
    assert [e.id for e in ex] == ["jsonl:1", "jsonl:2"]
    assert ex[0].prompt == "Capital of France?\nThe answer is: "
    assert ex[0].answers == ("Paris", "paris, france") and ex[1].answers == ("4",)


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "a"}\n{"question": "q2"}\n',
     r"qa.jsonl:2: row has no field 'answer'"),
    ('{"question": "q", "answer": "a"}\n{broken\n', r"qa.jsonl:2: malformed JSON"),
    ("", r"qa.jsonl: no rows"),
    ('["q", "a"]\n', r"qa.jsonl:1: expected an object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "qa.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        build_source("jsonl", JsonlParams(path=str(p)), None, 0, 0)


def test_jsonl_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        build_source("jsonl", JsonlParams(path=str(tmp_path / "nope.jsonl")), None, 0, 0)
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        build_source("jsonl", JsonlParams(path=str(p)), None, 0, 0)


def test_asking_for_more_rows_than_the_file_has_is_an_error(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match="has 1 items; cannot take n=5"):
        build_source("jsonl", JsonlParams(path=str(p)), 5, 0, 0)
