"""Mixtures: REMIX components and replay sized by ratio or count, seeded, with a manifest."""

from collections import Counter

from factmem.config import experiment_from_dict
from factmem.experiment import SetCache
from factmem.mixing import build_mixture


def make(stage2: dict, n: int = 10):
    raw = {
        "name": "t",
        "sets": {"a": {"source": "kvr", "n": n}, "b": {"source": "kvr", "n": n, "offset": 500}},
        "stages": [{"name": "s1", "set": "a", "mix": [{"source": "random-words", "ratio": 2}]},
                   {"name": "s2", "set": "b", **stage2}],
    }
    cfg = experiment_from_dict(raw).base
    return cfg, SetCache().sets(cfg)


def test_ratio_sizes_components_and_manifest_lists_ids():
    cfg, sets = make({"mix": [{"source": "generic", "ratio": 0.5}],
                      "replay": [{"stage": "s1", "ratio": 0.3}]})
    m1 = build_mixture(cfg, 0, sets, run_seed=0)
    assert Counter(c.role for c in m1.components) == {"main": 1, "mix": 1}
    assert len(m1.components[1].examples) == 20 and all(e.kind == "mix" for e in m1.components[1].examples)
    m2 = build_mixture(cfg, 1, sets, run_seed=0)
    sizes = {c.role: len(c.examples) for c in m2.components}
    assert sizes == {"main": 10, "mix": 5, "replay": 3}
    replay_ids = {e.id for e in m2.components[2].examples}
    assert replay_ids <= {e.id for e in sets["a"]} and len(replay_ids) == 3
    manifest = m2.manifest()
    assert manifest["total"] == 18
    assert manifest["components"][0]["ids"] == [e.id for e in sets["b"]]


def test_count_and_seeding():
    cfg, sets = make({"mix": [{"source": "random-words", "count": 4}]})
    a = build_mixture(cfg, 1, sets, run_seed=0)
    assert len(a.components[1].examples) == 4
    assert a.manifest() == build_mixture(cfg, 1, sets, run_seed=0).manifest()
    b = build_mixture(cfg, 1, sets, run_seed=1)
    assert [e.target for e in a.components[1].examples] != [e.target for e in b.components[1].examples]
    # stage 1 and stage 2 never draw the same random words
    s1 = {e.target for e in build_mixture(cfg, 0, sets, 0).components[1].examples}
    assert not s1 & {e.target for e in a.components[1].examples}


def test_replay_larger_than_its_set_cycles_through_it():
    cfg, sets = make({"replay": [{"set": "a", "ratio": 2.5}]}, n=4)
    items = build_mixture(cfg, 1, sets, 0).components[1].examples
    assert len(items) == 10 and Counter(e.id for e in items).most_common(1)[0][1] == 3
    assert {e.id for e in items} == {e.id for e in sets["a"]}
