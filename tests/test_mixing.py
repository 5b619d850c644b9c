"""Mixtures: REMIX components and replay sized by ratio or count, seeded, with a manifest."""

from collections import Counter

import pytest

from factmem.config import experiment_from_dict
from factmem.mixing import build_mixture
from factmem.sets import SetCache


def make(stage2: dict, n: int = 10):
    raw = {
        "name": "t",
        "sets": {"a": {"source": "kvr", "n": n}, "b": {"source": "kvr", "n": n, "offset": 500}},
        "stages": [{"name": "s1", "set": "a", "mix": [{"source": "random-words", "ratio": 2}]},
                   {"name": "s2", "set": "b", **stage2}],
    }
    cfg = experiment_from_dict(raw).first_variant
    return cfg, SetCache().sets(cfg)


def test_ratio_sizes_components_and_manifest_lists_ids():
    cfg, sets = make({"mix": [{"source": "generic", "ratio": 0.5}],
                      "replay": [{"stage": "s1", "ratio": 0.3}]})
    m1 = build_mixture(cfg, 0, sets, run_seed=0)
    assert Counter(c.role for c in m1.components) == {"main": 1, "mix": 1}
    assert len(m1.components[1].examples) == 20
    assert all(e.kind == "mix" for e in m1.components[1].examples)
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
    assert ([e.target for e in a.components[1].examples]
            != [e.target for e in b.components[1].examples])
    # stage 1 and stage 2 never draw the same random words
    s1 = {e.target for e in build_mixture(cfg, 0, sets, 0).components[1].examples}
    assert not s1 & {e.target for e in a.components[1].examples}


def test_replay_larger_than_its_set_cycles_through_it():
    cfg, sets = make({"replay": [{"set": "a", "ratio": 2.5}]}, n=4)
    items = build_mixture(cfg, 1, sets, 0).components[1].examples
    assert len(items) == 10 and Counter(e.id for e in items).most_common(1)[0][1] == 3
    assert {e.id for e in items} == {e.id for e in sets["a"]}


def two_stage(mix1: dict, mix2: dict, n: int = 32, seeds=(0,)):
    raw = {
        "name": "t", "seeds": list(seeds),
        "sets": {"a": {"source": "kvr", "n": n}, "b": {"source": "kvr", "n": n, "offset": 500}},
        "stages": [{"name": "s1", "set": "a", "mix": [mix1]},
                   {"name": "s2", "set": "b", "mix": [mix2]}],
    }
    cfg = experiment_from_dict(raw).first_variant
    return cfg, SetCache().sets(cfg)


def mix_ids(cfg, sets, stage, seed):
    return [e.id for e in build_mixture(cfg, stage, sets, seed).components[1].examples]


def test_built_in_generic_text_is_drawn_disjoint_across_stages_and_per_seed():
    cfg, sets = two_stage({"source": "generic", "ratio": 2}, {"source": "generic", "ratio": 2})
    s1, s2 = mix_ids(cfg, sets, 0, 0), mix_ids(cfg, sets, 1, 0)
    assert len(s1) == len(s2) == 64 and not set(s1) & set(s2)  # never the same passage twice
    assert set(mix_ids(cfg, sets, 0, 1)) != set(s1)  # another training seed, other passages
    assert mix_ids(cfg, sets, 1, 0) == s2  # and the same again for the same seed


def test_a_corpus_file_is_shuffled_per_seed_not_read_from_its_first_rows(tmp_path):
    import json

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{d}x{i}" for i in range(120))}) + "\n"
                            for d in range(60)))
    mix = {"source": "fineweb", "path": str(path), "ratio": 0.5}
    cfg, sets = two_stage(mix, mix)
    s1, s2 = mix_ids(cfg, sets, 0, 0), mix_ids(cfg, sets, 1, 0)
    assert len(s1) == 16 and not set(s1) & set(s2)
    assert s1 != [f"fineweb:{i}" for i in range(16)]  # not the stream's first rows
    assert mix_ids(cfg, sets, 0, 1) != s1


def test_asking_more_than_a_pool_holds_is_one_line_naming_the_key():
    from factmem.errors import DataError

    cfg, sets = two_stage({"source": "generic", "ratio": 6}, {"source": "generic", "ratio": 6})
    assert len(mix_ids(cfg, sets, 0, 0)) == 192  # stage 1 fits: 192 of 370
    with pytest.raises(DataError) as err:
        mix_ids(cfg, sets, 1, 0)  # stage 2 would need passages 192-384 of 370
    msg = str(err.value)
    assert msg.startswith("stages.1.mix.0: asks for 192 items of generic, but its pool holds 370")
    assert "earlier draws of this run took 192" in msg and "\n" not in msg


def test_amounts_round_half_up():
    from factmem.mixing import amount

    assert [amount(0.5, None, n) for n in (1, 3, 5)] == [1, 2, 3]  # round() would give 0, 2, 2


def test_a_factoid_source_is_not_mixing_data():
    # kvr drawn as "mix" with data seed 0 would repeat the stage's own facts (8 of 8)
    from factmem.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages\.1\.mix\.0\.source.*'kvr' makes factoid"):
        make({"mix": [{"source": "kvr", "ratio": 1}]})


def test_mixing_one_source_at_two_lengths_draws_disjoint_passages():
    # random-words passage i is one stream cut at `length` words: at lengths 8 and 16 the same
    # index gives a passage and its prefix, under the same id
    cfg, sets = make({"mix": [{"source": "random-words", "ratio": 2, "length": 8}]})
    s1 = build_mixture(cfg, 0, sets, 0).components[1].examples  # length 16 (default)
    s2 = build_mixture(cfg, 1, sets, 0).components[1].examples  # length 8
    assert not {e.id for e in s1} & {e.id for e in s2}
    texts1 = [f"{e.prompt} {e.target}" for e in s1]
    for e in s2:
        words = e.target.split()
        assert not any(" ".join(words) in t for t in texts1), e.id
    assert s2[0].id.startswith("random-words(length=8):")


def test_draws_that_overlap_through_offsets_are_refused():
    from factmem.errors import ConfigError

    cfg, sets = two_stage({"source": "random-words", "ratio": 1, "offset": 10},
                          {"source": "random-words", "ratio": 1}, n=20)
    assert len(mix_ids(cfg, sets, 0, 0)) == 20  # items 10-29
    with pytest.raises(ConfigError, match=r"stages\.1\.mix\.0: items 20-39 .* overlap items "
                                          r"10-29 drawn by stages\.0\.mix\.0"):
        build_mixture(cfg, 1, sets, 0)
