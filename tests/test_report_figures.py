"""Report figures stay readable for a study with many variants: the accuracy panels wrap into a
grid of at most 4 columns and line colours do not repeat."""

import struct
from pathlib import Path

from factmem.report import RunData, _color, fig_accuracy, fig_graded

SETS = ["kvr_a", "kvr_b"]
STAGES = ["base", "stage1", "stage2"]


def run_data(n_variants: int, tmp: Path) -> RunData:
    def record(x: float):
        grid = {st: {s: x for s in SETS} for st in STAGES}
        return {"stages": STAGES, "accuracy": grid, "token_acc": grid,
                "logprob": {st: {s: -x for s in SETS} for st in STAGES}}

    variants = [f"variant-with-a-long-name-{i}" for i in range(n_variants)]
    return RunData(root=tmp, exp=None, model="tiny", variants=variants, seeds=[0, 1, 2],
                   stages=STAGES, sets=SETS, own={"stage1": "kvr_a", "stage2": "kvr_b"},
                   accuracy={v: {s: record(i / n_variants) for s in range(3)}
                             for i, v in enumerate(variants)},
                   tables={}, summary={})


def png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_accuracy_panels_wrap_into_rows_of_four(tmp_path):
    one_row = png_size(fig_accuracy(run_data(4, tmp_path), tmp_path / "four"))
    three_rows = png_size(fig_accuracy(run_data(12, tmp_path), tmp_path / "twelve"))
    assert three_rows[0] == one_row[0]          # as wide as 4 panels, not 12
    assert three_rows[1] > 2.5 * one_row[1]     # three rows of panels


def test_line_colours_are_distinct_past_ten_variants():
    for n in (3, 10, 12, 20):
        colours = [str(_color(k, n)) for k in range(n)]
        assert len(set(colours)) == n, n


def test_graded_figure_with_many_variants_is_written(tmp_path):
    path = fig_graded(run_data(12, tmp_path), tmp_path)
    width, height = png_size(path)
    assert path.is_file() and width > height
