"""Probes build the questions they claim to, from KVR meta and from subject/relation/object."""

import torch

from factmem.analysis.probes import PROBES, build_probes, run_probes
from factmem.config import ModelConfig
from factmem.data import build_source
from factmem.data.examples import Example
from factmem.data.synthetic import KVRParams
from factmem.models import Formatter, load_model, load_tokenizer

KVR = build_source("kvr", KVRParams(), 6, 0, 0)


def test_kvr_probes():
    probes, skipped = build_probes(KVR, n_choices=4, seed=0)
    assert skipped == 0 and set(probes) == set(PROBES)
    for ex, para, choice, rev in zip(KVR, probes["paraphrase"], probes["choice"],
                                     probes["reverse"]):
        key, value = ex.meta["key"], ex.meta["value"]
        # paraphrase: same key and answer, different wording
        assert key in para.prompt and para.prompt != ex.prompt and para.answers[0] == value
        # choice: the gold value among 3 distractors, all values of other facts of the set
        opts = choice.meta["options"]
        others = {e.meta["value"] for e in KVR if e.id != ex.id}
        assert len(opts) == 4 and len(set(opts)) == 4 and value in opts
        assert set(opts) - {value} <= others
        assert all(o in choice.prompt for o in opts) and key in choice.prompt
        assert choice.answers[0] == value
        # reverse: asks for the key given the value
        assert value in rev.prompt and key not in rev.prompt and rev.answers[0] == key
    assert [e.id for e in probes["original"]] == [f"{e.id}#original" for e in KVR]
    # seeded: same options again, other seed may differ
    again, _ = build_probes(KVR, seed=0)
    assert ([e.meta["options"] for e in again["choice"]]
            == [e.meta["options"] for e in probes["choice"]])


def test_entity_probes_prefer_same_relation_distractors():
    def fact(i, s, r, o):
        return Example.qa(f"ent:{i}", f"What is the {r} of {s}?", o,
                          subject=s, relation=r, object=o)

    facts = [fact(0, "Varno Quill", "birthplace", "Osterlin"),
             fact(1, "Mira Tolt", "birthplace", "Kavenport"),
             fact(2, "Dace Ruhm", "birthplace", "Lindqvist Bay"),
             fact(3, "Orla Penn", "employer", "Brightwater Mills"),
             Example.qa("plain:0", "2+2?", "4")]
    probes, skipped = build_probes(facts, n_choices=3)
    assert skipped == 1 and len(probes["reverse"]) == 4
    ch = probes["choice"][0]
    assert set(ch.meta["options"]) == {"Osterlin", "Kavenport", "Lindqvist Bay"}
    para = probes["paraphrase"][0].prompt
    assert "birthplace" in para and "Varno Quill" in para
    rev = probes["reverse"][0]
    assert "Osterlin" in rev.prompt and rev.answers == ("Varno Quill",)


def test_run_probes_rows(tiny_model_dir):
    n = 3
    cfg = ModelConfig(name=str(tiny_model_dir))
    torch.manual_seed(0)
    model, fmt = load_model(cfg), Formatter(load_tokenizer(cfg))
    facts = build_source("kvr", KVRParams(key_length=4, value_length=3), n, 0, 0)
    rows, skipped = run_probes(model, fmt, facts)
    assert skipped == 0 and len(rows) == n * len(PROBES)
    assert all("choice_correct" in r for r in rows if r["probe"] == "choice")
    assert {r["id"] for r in rows} == {e.id for e in facts}
