"""Cross-section checks: references to sets and earlier stages, amounts, selections."""

import pytest


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["stages"][1].update(mix=[{"source": "random-words", "ratio": -1}]),
     r"stages.1.mix.0.ratio: must be >= 0, got -1"),
    (lambda r: r["stages"][1].update(mix=[{"source": "random-words"}]),
     r"stages.1.mix.0: give exactly one of `ratio` or `count`"),
    (lambda r: r["stages"][1].update(replay=[{"stage": "s2", "ratio": 1}]),
     r"stages.1.replay.0.stage: no earlier stage named 's2'"),
    (lambda r: r["stages"][0].update(set="c"), r"stages.0.set: no set named 'c'"),
    (lambda r: r["sets"]["a"].update(n=0), r"sets.a.n: must be >= 1, got 0 \(an empty set"),
    (lambda r: r.update(track=["zz"]), r"track.0: no set named 'zz'"),
])
def test_bad_configs_give_one_line_naming_the_key(mutate, message, base, refused):
    raw = base()
    mutate(raw)
    refused(raw, message)


def test_save_checkpoints_takes_stage_names(base, refused):
    refused(base(output={"save_checkpoints": ["s1", "s3"]}),
            r"output.save_checkpoints.1: no stage named 's3'.*valid: s1, s2")
    refused(base(output={"save_checkpoints": "s2"}),
            r"output.save_checkpoints: expected true/false or a list, got 's2'")
