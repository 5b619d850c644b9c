"""Variants against their baseline in where facts are stored: first decodable layer (earlier?),
its spread (more diverse?) and layer reversion, from synthetic tables whose answer is known.
End to end through `factmem analyze` and `factmem report`: tests/test_analysis_report.py."""

import math
import statistics
from types import SimpleNamespace

import pytest
from scipy import stats

from factmem.analysis import compare_layers as cl
from factmem.compare import paired_interval

N_LAYERS = 12
E = [-2, -1, 0, 0, 1, 2]  # per-fact offsets: sum 0, so the mean shift is exact


def experiment(seeds=(0, 1, 2), compare_with=()):
    stages = [SimpleNamespace(name="stage1", set="a"), SimpleNamespace(name="stage2", set="b")]
    cfg = {v: SimpleNamespace(stages=stages, track=["a", "b"], seeds=list(seeds),
                              baseline="naive", compare_with=list(cw))
           for v, cw in (("naive", ()), ("remix", compare_with), ("other", ()))}
    return SimpleNamespace(variants=cfg)


def lens(variant, seed, layers, stage="stage1", name="a", n_layers=N_LAYERS):
    return [{"variant": variant, "seed": seed, "stage": stage, "set": name, "id": f"f{i}",
             "n_layers": n_layers, "first_layer": x, "first_layer_first_token": x}
            for i, x in enumerate(layers)]


def earlier_by_two(seeds=(0, 1, 2)):
    """Baseline at layer 7 (seed 1: one fact at 8); the variant 2 layers earlier on average,
    its facts spread over five layers; per-seed means -2, -2.17, -1.83."""
    rows, diffs = [], []
    for s in seeds:
        base = [7, 7, 7, 7, 7, 8 if s == 1 else 7]
        e = list(E)
        e[3] += {0: 0, 1: -1, 2: 1}[s]
        var = [b - 2 + x for b, x in zip(base, e)]
        rows += lens("naive", s, base) + lens("remix", s, var)
        diffs.append([v - b for v, b in zip(var, base)])
    return rows, diffs


def only(rows, variant="remix", stage="stage1", name="a", baseline="naive"):
    [row] = [r for r in rows if (r["variant"], r["baseline"], r["stage"], r["set"])
             == (variant, baseline, stage, name)]
    return row


def md_line(md, *cells, width=None):
    """The cells of the one table line of `md` that starts with `cells` (and has `width`)."""
    prefix = "| " + " | ".join(cells) + " |"
    lines = [[c.strip() for c in x.strip("|").split("|")] for x in md.splitlines()
             if x.startswith(prefix)]
    [line] = [x for x in lines if width is None or len(x) == width]
    return line


def test_variant_two_layers_earlier_gives_a_negative_interval():
    rows, diffs = earlier_by_two()
    out = cl.summarize(experiment(), {"lens_facts": rows}, ["lens"])
    row = only(out[cl.LENS_KEY])
    d = row["diff_first_layer"]
    assert d["mean"] == pytest.approx(-2.0)  # variant − baseline: earlier is negative
    assert d["low"] < -2.0 < d["high"] < 0  # an interval with width, all of it "earlier"
    assert row["crossed"] is True and row["compared"] == {"0": 6, "1": 6, "2": 6}
    ref = paired_interval(diffs, (-N_LAYERS, N_LAYERS), crossed=True)
    assert (d["low"], d["high"]) == pytest.approx((ref["low"], ref["high"]))
    assert row["diff_depth"]["mean"] == pytest.approx(-2.0 / N_LAYERS)
    assert row["first_layer"]["baseline"]["mean"] == pytest.approx(7 + 1 / 18)
    md = cl.to_markdown(out)
    cells = md_line(md, "remix", "naive", "stage1", "a")
    header = cl.LENS_HEADERS.index("Δ first layer [95% CI] (< 0: variant earlier)")
    assert cells[header].startswith("-2.00 [")
    assert "< 0: variant earlier" in md


def test_more_diverse_variant_positive_spread_with_a_t_interval_over_seeds():
    rows, _ = earlier_by_two()
    row = only(cl.summarize(experiment(), {"lens_facts": rows}, ["lens"])[cl.LENS_KEY])
    sp = row["spread"]
    base_sd = [0.0, statistics.stdev([7] * 5 + [8]), 0.0]
    var_sd = [statistics.stdev(x) for x in ([3, 4, 5, 5, 6, 7], [3, 4, 5, 4, 6, 8],
                                             [3, 4, 5, 6, 6, 7])]
    assert sp["std"]["baseline"] == pytest.approx(base_sd, abs=1e-4)
    assert sp["std"]["variant"] == pytest.approx(var_sd, abs=1e-4)
    d = [v - b for v, b in zip(sp["std"]["variant"], sp["std"]["baseline"])]
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d),
                              scale=statistics.stdev(d) / math.sqrt(len(d)))
    assert sp["std"]["diff"]["mean"] == pytest.approx(statistics.fmean(d))
    assert (sp["std"]["diff"]["low"], sp["std"]["diff"]["high"]) == pytest.approx((lo, hi))
    assert sp["std"]["diff"]["low"] > 0  # the variant's facts are more spread in every seed
    # seed 0: baseline one layer (0 bits), variant layers 3,4,5,5,6,7 (4 x 1/6, 1 x 2/6)
    h = -(4 * (1 / 6) * math.log2(1 / 6) + (2 / 6) * math.log2(2 / 6))
    assert sp["entropy_bits"]["variant"][0] == pytest.approx(h, abs=1e-4)
    assert sp["entropy_bits"]["baseline"][0] == 0
    assert sp["entropy_bits"]["diff"]["mean"] > 0 and sp["distinct"]["diff"]["mean"] > 0


def test_one_seed_facts_only_and_no_spread_interval():
    rows, diffs = earlier_by_two(seeds=(0,))
    out = cl.summarize(experiment(seeds=(0,)), {"lens_facts": rows}, ["lens"])
    row = only(out[cl.LENS_KEY])
    assert row["diff_first_layer"]["covers"] == "facts only"
    assert row["diff_first_layer"]["high"] < 0
    assert row["spread"]["std"]["diff"]["low"] is None
    assert row["spread"]["std"]["diff"]["covers"] == "one seed"
    cells = md_line(cl.to_markdown(out), "remix", "naive", "stage1", "a")
    assert "no interval: one seed" in cells[cl.LENS_HEADERS.index(
        "Δ sample SD of first layer [95% CI] (> 0: variant more spread)")]


def test_facts_undecodable_on_one_side_are_excluded_and_counted():
    rows = (lens("naive", 0, [7, 7, None, None, 7, 7]) + lens("remix", 0, [None, None, 5, None,
                                                                            4, 6])
            + lens("naive", 1, [7, 8, 7, 7, 7, 7]) + lens("remix", 1, [5, 6, 5, 4, 6, 5])
            + lens("naive", 2, [7] * 6))  # seed 2: the variant has not run yet
    out = cl.summarize(experiment(), {"lens_facts": rows}, ["lens"])
    row = only(out[cl.LENS_KEY])
    assert row["seeds"] == [0, 1] and row["missing_seeds"] == [2]
    assert row["undecodable"]["0"] == {"variant_only": 2, "baseline_only": 1, "both": 1}
    assert row["undecodable"]["1"] == {"variant_only": 0, "baseline_only": 0, "both": 0}
    assert row["compared"] == {"0": 2, "1": 6}
    assert row["crossed"] is False  # other facts compared in each seed: nested
    ref = paired_interval([[-3, -1], [-2, -2, -2, -3, -1, -2]], (-12, 12), crossed=False)
    assert row["diff_first_layer"]["mean"] == pytest.approx(ref["mean"])
    assert row["diff_first_layer"]["low"] == pytest.approx(ref["low"])
    cells = md_line(cl.to_markdown(out), "remix", "naive", "stage1", "a")
    assert cells[4:7] == ["2 (one side only: 2)", "8/12", "2 / 1 / 1"]


def test_other_facts_or_nothing_decodable_is_not_compared():
    rows = lens("naive", 0, [7, 7, 7]) + lens("remix", 0, [5, 5, 5, 5])
    rows += lens("naive", 0, [None] * 3, name="b") + lens("remix", 0, [4] * 3, name="b")
    out = cl.summarize(experiment(seeds=(0,)), {"lens_facts": rows}, ["lens"])
    a, b = only(out[cl.LENS_KEY]), only(out[cl.LENS_KEY], name="b")
    assert a["facts_differ"] == {"0": {"variant_only": 1, "baseline_only": 0}}
    assert "diff_first_layer" not in a and "diff_first_layer" not in b
    assert b["undecodable"]["0"] == {"variant_only": 0, "baseline_only": 3, "both": 0}
    md = cl.to_markdown(out)
    assert "not compared: other facts (seed 0: 1 only in the variant" in md
    assert "not compared: no fact decodable on both sides" in md


def test_pairs_follow_baseline_and_compare_with():
    rows, _ = earlier_by_two()
    rows += [{**r, "variant": "other"} for r in rows if r["variant"] == "naive"]
    out = cl.summarize(experiment(compare_with=["other"]), {"lens_facts": rows}, ["lens"])
    pairs = {(r["variant"], r["baseline"]) for r in out[cl.LENS_KEY]}
    assert pairs == {("remix", "naive"), ("remix", "other"), ("other", "naive")}
    assert cl.summarize(SimpleNamespace(variants={"naive": SimpleNamespace(
        baseline=None, compare_with=[])}), {"lens_facts": rows}, ["lens"]) == {}


def reversion(variant, seed, kept, n=4, stage="stage1", name="a"):
    """kept: group -> number of the n facts still correct with that group reverted."""
    spans = {"none": (0, 0), "1": (1, 1), "2": (2, 2), "other": (0, 0), "all": (0, 0)}
    return [{"variant": variant, "seed": seed, "stage": stage, "set": name, "group": g,
             "layer_start": spans[g][0], "layer_end": spans[g][1], "id": f"f{i}",
             "correct": i < k, "token_acc": 1.0 if i < k else 0.5, "logprob": 0.0}
            for g, k in kept.items() for i in range(n)]


def test_reversion_variant_keeps_more_and_relies_less_on_one_block():
    rows = []
    for s, (v1, b1) in enumerate([(3, 1), (2, 1)]):
        rows += reversion("remix", s, {"none": 4, "1": v1, "2": 4, "other": 4, "all": 0})
        rows += reversion("naive", s, {"none": 4, "1": b1, "2": 3, "other": 4, "all": 0})
    out = cl.summarize(experiment(seeds=(0, 1)), {"reversion": rows}, ["reversion"])
    row = only(out[cl.REVERSION_KEY])
    blocks = {b["group"]: b for b in row["blocks"]}
    assert list(blocks) == ["none", "1", "2", "other", "all"]
    assert blocks["1"]["diff_correct"]["mean"] == pytest.approx(0.375)  # (2/4 + 1/4) / 2
    assert blocks["2"]["diff_correct"]["mean"] == pytest.approx(0.25)
    assert blocks["none"]["diff_correct"]["mean"] == 0
    drop = row["largest_drop"]
    assert [(d["drop"], d["block"]) for d in drop["variant"]] == [(0.25, "1"), (0.5, "1")]
    assert [(d["drop"], d["block"]) for d in drop["baseline"]] == [(0.75, "1"), (0.75, "1")]
    assert drop["diff"]["mean"] == pytest.approx(-0.375) and drop["diff"]["covers"] == "seeds"
    md = cl.to_markdown(out)
    cells = md_line(md, "remix", "naive", "stage1", "a", "1")
    assert cells[7] == "62.5 / 25.0" and cells[8].startswith("+37.5 [")
    assert md_line(md, "remix", "naive", "stage1", "a", "37.5 (1, 1)")[6].startswith("-37.5 [")


def test_reversion_with_other_blocks_on_one_side_is_not_compared():
    """One side analyzed again with --block 2: its blocks are not the baseline's."""
    rows = reversion("remix", 0, {"none": 4, "1": 3, "2": 4, "other": 4, "all": 0})
    rows += [{**r, "group": "1-2", "layer_end": 2} if r["group"] == "1" else r
             for r in reversion("naive", 0, {"none": 4, "1": 2, "other": 4, "all": 0})]
    out = cl.summarize(experiment(seeds=(0,)), {"reversion": rows}, ["reversion"])
    row = only(out[cl.REVERSION_KEY])
    assert row["blocks"] == [] and row["largest_drop"]["diff"] is None
    assert row["blocks_differ"] == {"variant_only": ["1", "2"], "baseline_only": ["1-2"]}
    md = cl.to_markdown(out)
    assert "not compared: other reverted blocks (variant only: 1, 2; baseline only: 1-2)" in md
