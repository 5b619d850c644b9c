"""The paper's data sets by name: real slices (../shared/data) and fixtures in the published
schemas, the shared field mapping, selection, match kinds, ROUGE-L, fictional entities."""

import json
from pathlib import Path

import pytest

from factmem.config import parse
from factmem.data import SOURCES, build_source, get_source
from factmem.data.public import sempre_answers
from factmem.errors import DataError
from factmem.scoring import is_match

FIXTURES = Path(__file__).parents[1] / "fixtures"
PAPER_SETS = ["popqa", "triviaqa", "entityquestions", "lama", "webquestions", "gsm8k", "math",
              "apps", "evolcode", "ultrachat", "fineweb", "knowledge-pile", "arxiv", "entities"]


def load(name, n=None, offset=0, seed=0, **params):
    return build_source(name, parse(get_source(name).params, params), n, offset, seed)


def test_every_paper_set_is_registered():
    assert set(PAPER_SETS) <= set(SOURCES)


def test_gsm8k_real_slice_scores_the_final_number(shared_data):
    ex = load("gsm8k", path=str(shared_data / "gsm8k" / "test.jsonl"))
    assert len(ex) == 1319 and ex[0].kind == "task"
    assert ex[0].prompt.startswith("Janet’s ducks lay 16 eggs") and ex[0].target.endswith("#### 18")
    assert ex[0].meta["match"] == "number"
    assert is_match("She makes 9 * 2 = 18 dollars.\n#### 18", ex[0].answers, "number")
    assert is_match("so the answer is 18", ex[0].answers, "number")
    assert not is_match("#### 19", ex[0].answers, "number")


def test_entityquestions_folder_relations_and_both_formats(shared_data):
    root = shared_data / "entityquestions"
    both = load("entityquestions", path=str(root))
    assert len(both) == 1000 + 885  # P106 once (json and jsonl hold the same rows), P36
    assert both[0].id == "entityquestions:P36:0" and both[0].meta["file"] == "P36.dev.jsonl"
    assert both[885].id == "entityquestions:P106:0" and both[885].meta["file"] == "P106.dev.json"
    p36 = load("entityquestions", path=str(root), relations=["P36"])
    assert p36[1].prompt == "What is the capital of County Wexford?" and p36[1].target == "Wexford"
    as_json = load("entityquestions", path=str(root / "P106.dev.json"))
    as_jsonl = load("entityquestions", path=str(root / "P106.dev.jsonl"))
    assert [(e.prompt, e.answers) for e in as_json] == [(e.prompt, e.answers) for e in as_jsonl]
    with pytest.raises(DataError, match="P999"):
        load("entityquestions", path=str(root), relations=["P999"])


def test_lama_trex_templates_are_built_in_and_equal_lamas(shared_data, tmp_path):
    """A released T-REx file loads without a relations file; the built-in table is LAMA's
    relations.jsonl, relation for relation; `relations_path` overrides it."""
    from factmem.data.public import TREX_TEMPLATES

    released = {(r := json.loads(line))["relation"]: r["template"] for line in
                (shared_data / "lama_trex" / "relations.jsonl").read_text().splitlines()}
    assert released == TREX_TEMPLATES and len(released) == 46
    alone = tmp_path / "TREx" / "P106.jsonl"  # as in LAMA's data.zip: no relations.jsonl beside
    alone.parent.mkdir()
    alone.write_text((shared_data / "lama_trex" / "P106.jsonl").read_text())
    trex = load("lama", path=str(alone))
    assert len(trex) == 300
    assert trex[0].prompt == "Fill in the blank: Shreela Ghosh is a ___ by profession."
    rel = tmp_path / "mine.jsonl"
    rel.write_text('{"relation": "P106", "template": "[X] works as a [Y] ."}\n')
    mine = load("lama", path=str(alone), relations_path=str(rel))
    assert mine[0].prompt == "Fill in the blank: Shreela Ghosh works as a ___."
    with pytest.raises(DataError, match="relations_path .*missing.jsonl: no such file"):
        load("lama", path=str(alone), relations_path=str(tmp_path / "missing.jsonl"))
    unknown = tmp_path / "P999.jsonl"
    unknown.write_text('{"sub_label": "a", "obj_label": "b", "predicate_id": "P999"}\n')
    with pytest.raises(DataError, match=r"P999.jsonl:1: no template for relation 'P999' \(not "):
        load("lama", path=str(unknown))


def test_lama_trex_and_google_re(shared_data):
    trex = load("lama", path=str(shared_data / "lama_trex" / "P106.jsonl"))
    assert len(trex) == 300
    assert trex[0].prompt == "Fill in the blank: Shreela Ghosh is a ___ by profession."
    assert trex[0].target == "actor" and trex[0].meta["relation"] == "P106"
    gre = load("lama", path=str(shared_data / "lama_google_re" / "place_of_death_test.jsonl"))
    assert gre[1].prompt == "Fill in the blank: Diego de Arroyo died in ___."
    assert gre[1].answers == ("Madrid", "City of Madrid")


def test_triviaqa_hub_schema_and_raw_release(shared_data):
    rc = load("triviaqa",
              path=str(shared_data / "triviaqa" / "rc_nocontext_validation_sample.jsonl"))
    assert len(rc) == 30
    assert rc[0].prompt == "Who were the backing group of Junior Walker?\nThe answer is: "
    assert rc[0].target == "The Allstars" and "allstars" in rc[0].answers
    raw = load("triviaqa", path=str(shared_data / "triviaqa" / "triviaqa_sample.json"))
    assert raw[0].target == "Sunset Boulevard" and "Sunset Blvd" in raw[0].answers


def test_webquestions_sempre_targets_and_contains(shared_data):
    ex = load("webquestions",
              path=str(shared_data / "webquestions" / "webquestions.examples.test.json"))
    assert len(ex) == 2032
    assert ex[0].prompt == "what does jamaican people speak?"
    assert ex[0].answers == ("Jamaican Creole English Language", "Jamaican English")
    assert ex[0].meta["match"] == "contains"
    assert is_match("They speak Jamaican English mostly.", ex[0].answers, "contains")
    # a released description with unescaped inner quotes stays one answer
    goebbels = next(e for e in ex if e.prompt == "what was goebbels role?")
    assert len(goebbels.answers) == 1 and '"Reich Minister' in goebbels.target
    assert sempre_answers("(list (description Lawyer))") == ["Lawyer"]


def test_generic_corpora_passage_completion(shared_data):
    for name, path in [("arxiv", shared_data / "generic" / "arxiv.jsonl"),
                       ("fineweb", FIXTURES / "fineweb.jsonl"),
                       ("knowledge-pile", FIXTURES / "knowledge_pile.jsonl")]:
        ex = load(name, path=str(path))
        e = ex[0]
        assert e.kind == "mix"
        assert e.prompt.startswith("Complete the following partial passage:\n\n")
        assert len(e.prompt.split("\n\n", 1)[1].split()) == 50 and len(e.target.split()) == 50
    assert len(load("fineweb", path=str(FIXTURES / "fineweb.jsonl"))) == 1  # short doc skipped
    with pytest.raises(DataError, match=r"c4-sample.01.jsonl:1: row has no field 'body'"):
        load("fineweb", path=str(shared_data / "generic" / "c4-sample.01.jsonl"), text_field="body")


def test_popqa_tsv_fixture_possible_answers():
    ex = load("popqa", path=str(FIXTURES / "popqa.tsv"))
    assert ex[0].prompt == "What is George Rankin's occupation?\nThe answer is: "
    assert ex[0].target == "politician" and "political leader" in ex[0].answers
    assert ex[1].answers[:2] == ("Russia", "Russian Federation")
    assert ex[0].meta["s_pop"] == "142"


def test_task_fixtures_math_apps_evolcode_ultrachat():
    m = load("math", path=str(FIXTURES / "math.jsonl"))
    assert m[0].kind == "task" and m[0].meta["match"] == "boxed"
    assert is_match("so it is \\boxed{14}", m[0].answers, "boxed")
    assert is_match("\\boxed{ \\frac{3}{4} }", m[1].answers, "boxed")
    apps = load("apps", path=str(FIXTURES / "apps.jsonl"))
    assert [e.meta["problem_id"] for e in apps] == [0, 1]  # competition and solution-less skipped
    assert apps[0].prompt == ("\nQUESTION:\nRead two integers and print their sum.\n\n\n"
                              "Use Standard Input format\nANSWER:\n")
    assert "Use Call-Based format" in apps[1].prompt and "def reverse" in apps[1].prompt
    assert apps[0].target.startswith("a, b = map(int")
    evol = load("evolcode", path=str(FIXTURES / "evolcode.json"))
    assert evol[1].target == "SELECT COUNT(*) FROM users;"
    chat = load("ultrachat", path=str(FIXTURES / "ultrachat.jsonl"))
    assert [r for r, _ in chat[0].messages] == ["user", "assistant", "user", "assistant"]
    assert chat[0].target.startswith("A few days") and chat[0].meta["turns"] == 2
    one_turn = load("ultrachat", path=str(FIXTURES / "ultrachat.jsonl"), max_turns=1)
    assert len(one_turn[0].messages) == 2


def test_parquet_and_save_to_disk_read_the_same_rows(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "math.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "math.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    ref = load("math", path=str(FIXTURES / "math.jsonl"))
    for path in (tmp_path / "math.parquet", tmp_path / "saved"):
        got = load("math", path=str(path))
        assert [(e.messages, e.answers) for e in got] == [(e.messages, e.answers) for e in ref]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="give one of them"):
        load("math", path=str(tmp_path / "dict"))


def test_missing_field_and_malformed_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "gsm.jsonl"
    bad.write_text('{"question": "q", "answer": "1\\n#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"gsm.jsonl:2: row has no field 'answer'"):
        load("gsm8k", path=str(bad))
    bad.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(DataError, match=r"gsm.jsonl:1: .*####"):
        load("gsm8k", path=str(bad))
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(DataError, match=r"gsm.jsonl:2: malformed JSON"):
        load("gsm8k", path=str(bad))
    wq = tmp_path / "wq.json"
    wq.write_text('[{"utterance": "x?", "targetValue": "Paris"}]')
    with pytest.raises(DataError, match=r"wq.json:1: field 'targetValue'"):
        load("webquestions", path=str(wq))


def test_selection_offset_shuffle_and_stable_ids(shared_data):
    path = str(shared_data / "gsm8k" / "test.jsonl")
    a = load("gsm8k", n=10, path=path)
    b = load("gsm8k", n=10, offset=10, path=path)
    assert {e.id for e in a}.isdisjoint({e.id for e in b}) and b[0].id == "gsm8k:10"
    s1 = load("gsm8k", n=10, seed=1, path=path, shuffle=True)
    s2 = load("gsm8k", n=10, seed=2, path=path, shuffle=True)
    assert s1 == load("gsm8k", n=10, seed=1, path=path, shuffle=True)
    assert [e.id for e in s1] != [e.id for e in s2]
    full = {e.id: e for e in load("gsm8k", path=path)}
    assert all(full[e.id] == e for e in s1)  # an item keeps its id under shuffling
    with pytest.raises(DataError, match="1319 items"):
        load("gsm8k", n=2000, path=path)


def test_entityquestions_has_no_hub_copy():
    with pytest.raises(DataError, match="give `path`"):
        load("entityquestions")


def test_entities_are_fictional_seeded_and_disjoint_by_offset():
    from factmem.data.entities import RELATIONS

    a = load("entities", n=45)
    b = load("entities", n=45, offset=2000)
    assert len(RELATIONS) >= 10 and {e.meta["relation"] for e in a} == {r.name for r in RELATIONS}
    assert a[0].id == "entities:0" and b[0].id == "entities:2000"
    assert load("entities", n=5, offset=40) == a[40:45]
    subjects = [e.meta["subject"] for e in a + b]
    assert len(set(subjects)) == len(subjects)
    assert a[0].prompt.endswith("\nThe answer is: ") and a[0].target == a[0].meta["object"]
    assert load("entities", n=3, seed=1)[0].id == "entities@1:0"
    assert load("entities", n=3, seed=1)[0].target != a[0].target
    bare = load("entities", n=2, prompt_template="{question}", relations=["capital"])
    assert bare[0].prompt.startswith("What is the capital of ") and bare[0].prompt.endswith("?")
