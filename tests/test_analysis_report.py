"""End to end: a tiny run with checkpoints and retention curves, then `factmem analyze` and
`factmem report`: tidy tables keyed by variant/seed/stage/set, a self-contained HTML report whose
images are valid PNGs."""

import base64
import json
import os
import re
import struct
import zlib

import pytest
from test_cli import tiny_config

from factmem.analysis import compare_layers
from factmem.cli import main
from factmem.rundir import RunLock, lock_path

pytestmark = pytest.mark.slow  # a tiny 2-variant run + every instrument: ~80 s on a busy 2-core box


@pytest.fixture(scope="module")
def analyzed(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    cfg = tiny_config(tiny_model_dir, tmp, eval={"retention_every": 1}, baseline="naive",
                      output={"dir": str(tmp / "runs"), "save_checkpoints": True})
    text = cfg.read_text().replace("  replay:\n    stages.stage2.replay:\n    - ratio: 0.5\n"
                                   "      stage: stage1\n", "")
    cfg.write_text(text)
    assert main(["run", str(cfg), "--no-progress"]) == 0
    root = tmp / "runs" / "tiny"
    assert main(["analyze", str(root)]) == 0
    return root


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_analyze_writes_tidy_tables(analyzed):
    a = analyzed / "analysis"
    variants = {"naive", "remix"}
    ret = rows(a / "retention.jsonl")
    assert {r["variant"] for r in ret} == variants
    assert {r["stage"] for r in ret} == {"stage1", "stage2"}
    assert {"seed", "step", "set", "id", "correct", "token_acc", "logprob"} <= set(ret[0])
    graded = rows(a / "graded.jsonl")
    assert len(graded) == 2 * 3 * 2 * 6  # variants x (base + 2 stages) x sets x facts
    layers = rows(a / "lens_layers.jsonl")
    # variants x checkpoints x sets x facts x (2 layers + 1)
    assert len(layers) == 2 * 2 * 2 * 6 * 3
    facts = rows(a / "lens_facts.jsonl")
    assert {(r["variant"], r["stage"], r["set"]) for r in facts} == {
        (v, st, s) for v in variants for st in ("stage1", "stage2") for s in ("kvr_a", "kvr_b")}
    rev = rows(a / "reversion.jsonl")
    # each stage against its own set: none, layer 1, layer 2, other, all
    assert {(r["stage"], r["set"]) for r in rev} == {("stage1", "kvr_a"), ("stage2", "kvr_b")}
    assert len(rev) == 2 * 2 * 5 * 6
    probes = rows(a / "probes.jsonl")
    assert {r["probe"] for r in probes} == {"original", "paraphrase", "choice", "reverse"}
    summary = json.loads((a / "summary.json").read_text())
    assert {"lens", "probes", "reversion"} <= set(summary) and not summary["notes"]
    # the lens's top-1 at the last layer agrees with the run's own teacher-forced verdicts
    g = {(r["variant"], r["stage"], r["set"], r["id"]): r for r in graded}
    for f in facts:
        if g[(f["variant"], f["stage"], f["set"], f["id"])]["correct"]:
            assert f["first_layer"] is not None


def png_ok(data: bytes) -> bool:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    length, kind = struct.unpack(">I4s", data[8:16])
    chunk = data[12 : 16 + length]
    crc = struct.unpack(">I", data[16 + length : 20 + length])[0]
    return kind == b"IHDR" and zlib.crc32(chunk) == crc and data.endswith(b"IEND\xaeB`\x82")


def test_report_images_are_valid_pngs_referenced_by_the_html(analyzed, capsys):
    assert main(["report", str(analyzed)]) == 0
    html = (analyzed / "report.html").read_text()
    md = (analyzed / "report.md").read_text()
    pngs = sorted((analyzed / "report").glob("*.png"))
    names = {p.name for p in pngs}
    assert names == {"accuracy.png", "forgetting.png", "retention.png", "graded.png", "lens.png",
                     "first_layer.png", "reversion.png", "probes.png"}
    embedded = [base64.b64decode(b)
                for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]
    assert len(embedded) == len(pngs)
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    assert all(png_ok(b) for b in embedded)
    for p in pngs:
        assert f"](report/{p.name})" in md
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    assert "model: " in md and "variants: naive, remix" in md
    assert "## Where facts are stored: variants against their baseline" in md
    assert "Δ first layer [95% CI] (< 0: variant earlier)" in md
    assert "| remix | naive | stage2 | kvr_b | none |" in md  # reversion, nothing reverted


def test_layers_comparison_against_the_baseline(analyzed):
    """summary.json and analysis/layers_comparison.md pair remix with its baseline at every
    checkpoint and set; every fact is compared or counted as not decodable."""
    summary = json.loads((analyzed / "analysis" / "summary.json").read_text())
    lens = summary[compare_layers.LENS_KEY]
    assert {(r["variant"], r["baseline"], r["stage"], r["set"]) for r in lens} == {
        ("remix", "naive", st, s) for st in ("stage1", "stage2") for s in ("kvr_a", "kvr_b")}
    for r in lens:
        for s, n in r["facts"].items():
            assert r["compared"][s] + sum(r["undecodable"][s].values()) == n == 6
    rev = summary[compare_layers.REVERSION_KEY]
    assert {(r["stage"], r["set"]) for r in rev} == {("stage1", "kvr_a"), ("stage2", "kvr_b")}
    assert all([b["group"] for b in r["blocks"]] == ["none", "1", "2", "other", "all"]
               for r in rev)
    md = (analyzed / "analysis" / compare_layers.LAYERS_MD).read_text()
    assert md == compare_layers.to_markdown(summary)
    assert "| remix | naive | stage1 | kvr_a | 1 |" in md


def test_bad_input_exits_2(analyzed, tmp_path, capsys):
    assert main(["analyze", str(analyzed), "--what", "lens,bogus"]) == 2
    assert "unknown analysis 'bogus'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_analyze_one_variant_keeps_the_others(analyzed):
    path = analyzed / "analysis" / "lens_facts.jsonl"
    before = sorted(map(json.dumps, rows(path)))
    before_comp = json.loads((analyzed / "analysis" / "summary.json").read_text())[
        compare_layers.LENS_KEY]
    assert main(["analyze", str(analyzed), "--what", "lens", "--variant", "remix"]) == 0
    assert sorted(map(json.dumps, rows(path))) == before  # same rows, redone for remix
    summary = json.loads((analyzed / "analysis" / "summary.json").read_text())
    assert {"lens", "probes", "reversion"} <= set(summary)  # others' aggregates kept
    # the comparison pairs remix's new rows with naive's kept ones
    assert summary[compare_layers.LENS_KEY] == before_comp
    assert main(["analyze", str(analyzed), "--variant", "nope"]) == 2


def test_a_second_analysis_of_one_run_is_refused(analyzed, capsys):
    # each analysis writes back the tables it read at its start: two at once would lose rows
    before = (analyzed / "analysis" / "summary.json").read_text()
    with RunLock(analyzed, purpose="analyze"):  # held by this (live) process
        assert main(["analyze", str(analyzed), "--what", "lens", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"analyze of {analyzed} is in use by process {os.getpid()}@" in err
        assert lock_path(analyzed, "run").exists() is False  # the run's own lock is not taken
    assert (analyzed / "analysis" / "summary.json").read_text() == before
    assert not lock_path(analyzed, "analyze").exists()
    # while a run holds its lock an analysis still goes ahead (analyze variants as they finish)
    with RunLock(analyzed):
        assert main(["analyze", str(analyzed), "--what", "lens", "--no-progress"]) == 0
    assert not lock_path(analyzed, "analyze").exists()  # released after the analysis
