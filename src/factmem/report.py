"""`factmem report RUN_DIR`: report.md and a self-contained report.html with PNG figures.

Figures (RUN_DIR/report/*.png, embedded in the HTML as data URIs, so it opens without network):
accuracy-matrix heat maps, retention curves per variant, graded retention, logit-lens curves by
layer, first-decodable-layer histograms, layer-reversion curves, probe accuracies. Each carries
a footer naming the model, sets, variants and seeds. Tables of each variant against its
baseline in where facts are stored come from analysis/compare_layers.py. Sections whose
tables `factmem analyze` has not written are listed as missing, not drawn empty.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factmem import files
from factmem.analysis import compare_layers
from factmem.analysis.analyze import TABLES, collect_graded, collect_retention
from factmem.compare import load_comparison
from factmem.compare import to_markdown as compare_markdown
from factmem.errors import FactmemError
from factmem.results import mean as _mean
from factmem.rundir import (
    BASE_STAGE,
    METRICS_FILE,
    REPORT_FIGURES_DIR,
    REPORT_HTML,
    REPORT_MD,
    RunPaths,
    analysis_summary,
    analysis_table,
    finished_record,
    open_run,
    read_json,
    read_jsonl,
    stage_dirs,
)

log = logging.getLogger(__name__)


@dataclass
class Section:
    title: str
    text: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    figure: Path | None = None


@dataclass
class RunData:
    root: Path
    exp: Any
    model: str
    variants: list[str]
    seeds: list[int]
    stages: list[str]  # base first
    sets: list[str]
    own: dict[str, str]  # stage -> set it trains
    accuracy: dict[str, dict[int, dict[str, Any]]]  # variant -> seed -> accuracy record
    tables: dict[str, list[dict[str, Any]]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        return (f"model: {self.model} | sets: {', '.join(self.sets)} | "
                f"variants: {', '.join(self.variants)} | seeds: {', '.join(map(str, self.seeds))}")


def load_data(run_dir: str | Path) -> RunData:
    root, exp = open_run(run_dir)
    first = exp.first_variant
    accuracy: dict[str, dict[int, dict[str, Any]]] = {}
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for vname, cfg in exp.variants.items():
        for seed in cfg.seeds:
            sd = RunPaths(root).seed_dir(vname, seed)
            record = finished_record(cfg, sd)  # the stages finished so far
            if record is not None:
                accuracy.setdefault(vname, {})[seed] = record
            key = {"variant": vname, "seed": seed}
            if not analysis_table(root, "retention").is_file():  # read straight from the run
                tables["retention"] += collect_retention(stage_dirs(cfg, sd), key)
            if not analysis_table(root, "graded").is_file():
                tables["graded"] += collect_graded(cfg, stage_dirs(cfg, sd), key)
    if not accuracy:
        raise FactmemError(f"{root}: no stage has finished (no {METRICS_FILE}); nothing to report")
    for name in TABLES:
        path = analysis_table(root, name)
        if path.is_file():
            tables[name] = read_jsonl(path)
    summary_path = analysis_summary(root)
    summary = read_json(summary_path) if summary_path.is_file() else {}
    seeds = sorted({s for v in accuracy.values() for s in v})
    return RunData(root, exp, first.model.name, list(accuracy), seeds,
                   [BASE_STAGE, *[s.name for s in first.stages]], list(first.track),
                   {s.name: s.set for s in first.stages}, accuracy, dict(tables), summary)


# --------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, data: RunData, path: Path) -> Path:
    # the footer wrapped to the figure's width (7-point text: about 18 characters per inch), so
    # a run with many variants is not cut off at both edges
    width_in, height_in = fig.get_size_inches()
    footer = textwrap.fill(data.label, width=max(40, int(width_in * 18)))
    lines = footer.count("\n") + 1
    fig.text(0.5, 0.005, footer, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, min(0.3, 0.03 + lines * 0.12 / height_in), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, format="png")
    _plt().close(fig)
    return path


def _color(k: int, n: int):
    """The k-th of n line colours: matplotlib's 10-colour cycle, or tab20 past 10 lines (the
    cycle would repeat colours)."""
    if n <= 10:
        return f"C{k}"
    return _plt().get_cmap("tab20")(k % 20)


def _stages(records) -> list[str]:
    """Stages every seed's record has (a stopped run may lack the last ones)."""
    return [st for st in records[0]["stages"] if all(st in r["accuracy"] for r in records)]


def fig_accuracy(data: RunData, out: Path) -> Path:
    plt = _plt()
    n = len(data.variants)
    cols = min(n, 4)  # a grid, not one long row, when a study has many variants
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 1.3 * len(data.sets) * cols,
                                                  rows * (0.9 + 0.5 * len(data.stages))),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, v in zip(axes.flat, data.variants):
        recs = list(data.accuracy[v].values())
        stages = _stages(recs)
        grid = [[_mean(r["accuracy"][st][s] for r in recs) for s in data.sets] for st in stages]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, x in enumerate(row):
                ax.text(j, i, f"{100 * x:.0f}", ha="center", va="center",
                        color="white" if x < 0.6 else "black", fontsize=9)
        ax.set_xticks(range(len(data.sets)), data.sets)
        ax.set_yticks(range(len(stages)), [f"after {s}" for s in stages])
        ax.set_title(f"{v}: exact match (%)", fontsize=10)
    return _save(fig, data, out / "accuracy.png")


def _retention_series(rows, variant):
    """Per seed [(global step, set -> accuracy, set -> token_acc)] with stages laid end to end,
    and the stage bounds. Seeds take different numbers of steps (stop rules), so each stage gets
    the width of its longest seed and seeds are drawn, not averaged: a mean past a short seed's
    end would mix seeds with stages."""
    mine = [r for r in rows if r["variant"] == variant]
    stage_order = list(dict.fromkeys(r["stage"] for r in mine))
    offsets, bounds, offset = {}, [], 0
    for st in stage_order:
        offsets[st] = offset
        offset += max(r["step"] for r in mine if r["stage"] == st)
        bounds.append((offset, st))
    by = defaultdict(lambda: defaultdict(list))
    for r in mine:
        by[r["seed"]][(r["stage"], r["step"], r["set"])].append(r)
    series = {}
    for seed, cells in by.items():
        points = sorted({(offsets[st], step, st) for st, step, _ in cells})
        series[seed] = [(off + step,
                         {k[2]: _mean(x["correct"] for x in v)
                          for k, v in cells.items() if k[:2] == (st, step)},
                         {k[2]: _mean(x["token_acc"] for x in v)
                          for k, v in cells.items() if k[:2] == (st, step)})
                        for off, step, st in points]
    return series, bounds


def fig_retention(data: RunData, out: Path) -> Path | None:
    rows = data.tables.get("retention", [])
    if not rows:
        return None
    plt = _plt()
    variants = [v for v in data.variants if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(len(variants), 1, figsize=(7.5, 2.4 * len(variants)), squeeze=False,
                             sharey=True)
    for ax, v in zip(axes[:, 0], variants):
        series, bounds = _retention_series(rows, v)
        lw = 1.5 if len(series) == 1 else 1.0
        for n, points in enumerate(series.values()):
            for k, s in enumerate(data.sets):
                xs = [x for x, acc, _ in points if s in acc]
                color = f"C{k}"
                ax.plot(xs, [acc[s] for _, acc, _ in points if s in acc], "-o", ms=2, lw=lw,
                        color=color, label=None if n else f"{s} exact match")
                ax.plot(xs, [tok[s] for _, _, tok in points if s in tok], "--", lw=lw,
                        color=color, alpha=0.6, label=None if n else f"{s} token acc")
        start = 0
        for end, st in bounds:
            ax.axvline(end, color="0.7", lw=0.8)
            ax.text((start + end) / 2, 1.04, st, ha="center", fontsize=8)
            start = end
        ax.set_ylim(-0.02, 1.1)
        ax.set_ylabel(v)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
    axes[-1, 0].set_xlabel("optimizer step (stages laid end to end)")
    title = "Retention curves: tracked sets during training"
    if any(len({r["seed"] for r in rows if r["variant"] == v}) > 1 for v in variants):
        title += " (one line per seed)"
    fig.suptitle(title, fontsize=10)
    return _save(fig, data, out / "retention.png")


def fig_forgetting(data: RunData, out: Path) -> Path | None:
    """The first stage's set during the last stage, per variant: mean exact match over seeds
    (line) and the spread between seeds (band: min to max), one panel per baseline group."""
    rows = data.tables.get("retention", [])
    cfg = data.exp.first_variant
    if not rows or len(cfg.stages) < 2:
        return None
    watched, last = cfg.stages[0].set, cfg.stages[-1].name
    rows = [r for r in rows if r["set"] == watched and r["stage"] == last]
    if not rows:
        return None
    groups: dict[str, list[str]] = defaultdict(list)
    for v in data.variants:
        groups[data.exp.variants[v].baseline or "all variants"].append(v)
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(max(6.5, 4.6 * len(groups)), 3.6),
                             squeeze=False, sharey=True)
    for ax, (base, variants) in zip(axes[0], groups.items()):
        for k, v in enumerate(variants):
            xs, mean, low, high, seeds = _forgetting_curve([r for r in rows if r["variant"] == v])
            if not xs:
                continue
            ax.plot(xs, mean, "-", color=f"C{k}", lw=1.6, label=f"{v} ({seeds} seeds)")
            ax.fill_between(xs, low, high, color=f"C{k}", alpha=0.15)
        ax.set_title(f"compared with {base}" if base != "all variants" else base, fontsize=9)
        # mixing adds items, so a mixed stage takes more steps per epoch: epochs line up
        ax.set_xlabel(f"epochs of {last}")
        ax.set_ylim(-0.02, 1.05)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(f"{watched}: exact match")
    fig.suptitle(f"{watched} during {last}: mean over seeds, band from lowest to highest seed",
                 fontsize=10)
    return _save(fig, data, out / "forgetting.png")


def _forgetting_curve(rows) -> tuple[list[float], list[float], list[float], list[float], int]:
    """Exact match per retention point, x in epochs (step / steps per epoch of each seed),
    mean/min/max over the seeds that reach the point."""
    per: dict[tuple[int, int], list[bool]] = defaultdict(list)
    for r in rows:
        per[(r["seed"], r["step"])].append(bool(r["correct"]))
    last = defaultdict(int)
    epochs = defaultdict(int)
    for r in rows:
        last[r["seed"]] = max(last[r["seed"]], r["step"])
        epochs[r["seed"]] = max(epochs[r["seed"]], r["epoch"])
    by_x: dict[float, list[float]] = defaultdict(list)
    for (seed, step), hits in per.items():
        x = round(step * epochs[seed] / last[seed], 3) if last[seed] else 0.0
        by_x[x].append(_mean(hits))
    xs = sorted(by_x)
    return (xs, [_mean(by_x[x]) for x in xs], [min(by_x[x]) for x in xs],
            [max(by_x[x]) for x in xs], len(last))


def fig_graded(data: RunData, out: Path) -> Path:
    plt = _plt()
    # one legend for all panels, in a column of its own (per-panel legends hid the lines)
    n_sets = len(data.sets)
    fig, axes = plt.subplots(2, n_sets + 1, figsize=(3.4 * n_sets + 2.4, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3.4] * n_sets + [2.4]})
    for j, s in enumerate(data.sets):
        for i, (metric, name) in enumerate((("token_acc", "token accuracy"),
                                            ("logprob", "gold mean log-prob"))):
            ax = axes[i, j]
            for k, v in enumerate(data.variants):
                recs = list(data.accuracy[v].values())
                stages = _stages(recs)
                ax.plot(range(len(stages)),
                        [_mean(r[metric][st][s] for r in recs) for st in stages],
                        "-o", color=_color(k, len(data.variants)), label=v)
                ax.set_xticks(range(len(stages)), stages, fontsize=8)
            ax.set_title(f"{s}: {name}", fontsize=9)
            if i == 0:
                ax.set_ylim(-0.02, 1.02)
    for ax in axes[:, -1]:
        ax.axis("off")
    axes[0, -1].legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc="upper left",
                       frameon=False)
    fig.suptitle("Graded retention after each stage (teacher forced)", fontsize=10)
    return _save(fig, data, out / "graded.png")


def _lens_panels(data: RunData) -> list[tuple[str, str]]:
    """(stage, set) panels: each set at the checkpoint of the stage that trained it, then at
    the last stage."""
    have = {(r["stage"], r["set"]) for r in data.tables.get("lens_facts", [])}
    last = data.stages[-1]
    panels = []
    for st, s in data.own.items():
        for p in ((st, s), (last, s)):
            if p in have and p not in panels:
                panels.append(p)
    return panels


def fig_lens(data: RunData, out: Path) -> Path | None:
    rows = data.tables.get("lens_layers", [])
    panels = _lens_panels(data)
    if not rows or not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False,
                             sharey=True)
    for ax, (st, s) in zip(axes[0], panels):
        for k, v in enumerate(data.variants):
            by = defaultdict(list)
            for r in rows:
                if (r["variant"], r["stage"], r["set"]) == (v, st, s):
                    by[r["layer"]].append(r)
            layers = sorted(by)
            ax.plot(layers, [_mean(x["top1_all"] for x in by[L]) for L in layers], "-",
                    color=f"C{k}", label=f"{v}: answer top-1")
            ax.plot(layers, [_mean(x["prob_first"] for x in by[L]) for L in layers], ":",
                    color=f"C{k}", label=f"{v}: p(first token)")
        ax.set_title(f"{s} after {st}", fontsize=9)
        ax.set_xlabel("layer (0 = embeddings)")
    axes[0, 0].set_ylabel("fraction of facts / probability")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Logit lens: answer decodable at each layer", fontsize=10)
    return _save(fig, data, out / "lens.png")


def fig_first_layer(data: RunData, out: Path) -> Path | None:
    rows = data.tables.get("lens_facts", [])
    panels = _lens_panels(data)
    if not rows or not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False,
                             sharey=True)
    n_layers = rows[0]["n_layers"]
    width = 0.8 / max(len(data.variants), 1)
    for ax, (st, s) in zip(axes[0], panels):
        for k, v in enumerate(data.variants):
            firsts = [r["first_layer"] for r in rows
                      if (r["variant"], r["stage"], r["set"]) == (v, st, s)]
            dec = [x for x in firsts if x is not None]
            counts = [dec.count(L) for L in range(n_layers + 1)]
            ax.bar([L - 0.4 + width * (k + 0.5) for L in range(n_layers + 1)], counts, width,
                   color=f"C{k}", label=f"{v} ({len(dec)}/{len(firsts)}, mean "
                   f"{_mean(dec):.1f})" if dec else f"{v} (0/{len(firsts)})")
        ax.set_title(f"{s} after {st}", fontsize=9)
        ax.set_xlabel("first layer from which the answer stays top-1")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("facts")
    fig.suptitle("First decodable layer per fact", fontsize=10)
    return _save(fig, data, out / "first_layer.png")


def fig_reversion(data: RunData, out: Path) -> Path | None:
    rows = data.summary.get("reversion") or []
    rows = [r for r in rows if r["layer_start"] > 0]
    if not rows:
        return None
    plt = _plt()
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    block = data.summary.get("block", 1)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False,
                             sharey=True)
    for ax, st in zip(axes[0], stages):
        for k, v in enumerate(data.variants):
            by = defaultdict(list)
            for r in rows:
                if (r["variant"], r["stage"]) == (v, st):
                    by[(r["layer_start"], r["layer_end"])].append(r)
            keys = sorted(by)
            mids = [(a + b) / 2 for a, b in keys]
            ax.plot(mids, [_mean(x["accuracy"] for x in by[k2]) for k2 in keys], "-o", ms=3,
                    color=f"C{k}", label=f"{v}: exact match")
            ax.plot(mids, [_mean(x["token_acc"] for x in by[k2]) for k2 in keys], ":",
                    color=f"C{k}", label=f"{v}: token acc")
        s = data.own.get(st, "")
        ax.set_title(f"{s} after {st}: one block of {block} layer{'s' if block > 1 else ''} "
                     "reverted", fontsize=9)
        ax.set_xlabel("reverted layer" if block == 1 else "reverted block (centre layer)")
        ax.set_ylim(-0.02, 1.05)
    axes[0, 0].set_ylabel("accuracy after reverting")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Layer reversion: which layers hold the stage's facts", fontsize=10)
    return _save(fig, data, out / "reversion.png")


def fig_probes(data: RunData, out: Path) -> Path | None:
    rows = [r for r in data.summary.get("probes") or [] if data.own.get(r["stage"]) == r["set"]]
    if not rows:
        return None
    plt = _plt()
    panels = list(dict.fromkeys((r["stage"], r["set"]) for r in rows))
    names = ["original", "paraphrase", "choice", "choice (likelihood)", "reverse"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.2), squeeze=False,
                             sharey=True)
    width = 0.8 / max(len(data.variants), 1)
    for ax, (st, s) in zip(axes[0], panels):
        for k, v in enumerate(data.variants):
            vals = []
            for n in names:
                probe = "choice" if n.startswith("choice") else n
                key = "choice_accuracy" if n == "choice (likelihood)" else "accuracy"
                sel = [r[key] for r in rows if (r["variant"], r["stage"], r["set"], r["probe"])
                       == (v, st, s, probe)]
                vals.append(_mean(sel))
            ax.bar([i - 0.4 + width * (k + 0.5) for i in range(len(names))], vals, width,
                   color=f"C{k}", label=v)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(f"{s} right after {st}", fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Manipulation probes on memorized facts", fontsize=10)
    return _save(fig, data, out / "probes.png")


# --------------------------------------------------------------------------------------------
# Sections (one list renders to both markdown and HTML)


def _pct(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _num(x, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def sections(data: RunData, figdir: Path) -> list[Section]:
    """The report's sections in order; those with nothing to show say why or are left out."""
    out = [accuracy_section(data, figdir), comparison_section(data, figdir),
           retention_section(data, figdir), graded_section(data, figdir),
           *lens_sections(data, figdir), reversion_section(data, figdir),
           *layers_comparison_sections(data), probes_section(data, figdir)]
    return [s for s in out if s is not None]


def accuracy_section(data: RunData, figdir: Path) -> Section:
    rows = []
    for v in data.variants:
        recs = list(data.accuracy[v].values())
        for st in _stages(recs):
            rows.append([v, st, *[_pct(_mean(r["accuracy"][st][s] for r in recs))
                                  for s in data.sets]])
    partial = [v for v in data.variants
               if len(_stages(list(data.accuracy[v].values()))) < len(data.stages)]
    text = "Exact match (%) on each tracked set after each stage, mean over seeds."
    if partial:
        text += f" Not finished (stages shown are those done): {', '.join(partial)}."
    return Section("Accuracy matrix", text, ["variant", "after", *data.sets], rows,
                   fig_accuracy(data, figdir))


def comparison_section(data: RunData, figdir: Path) -> Section | None:
    comp = load_comparison(data.root)
    if comp is None:
        return None
    table = compare_markdown(comp)
    rows = [line.strip("|").split(" | ") for line in table.splitlines()[2:]
            if line.startswith("|")]
    return Section("Variants against their baseline", table.strip().splitlines()[-1],
                   ["variant", "vs", "set", "exact match %", "Δ exact match [95% CI]",
                    "token acc", "Δ token acc [95% CI]", "gold log-prob", "Δ log-prob [95% CI]",
                    "MDE (exact match)"],
                   [[c.strip() for c in row] for row in rows], fig_forgetting(data, figdir))


def retention_section(data: RunData, figdir: Path) -> Section:
    if not data.tables.get("retention"):
        return Section("Retention curves", "Not recorded: run with `eval.retention_every: N`.")
    return Section("Retention curves", "Tracked sets evaluated every `eval.retention_every` "
                   "optimizer steps (solid: exact match, dashed: teacher-forced token accuracy).",
                   figure=fig_retention(data, figdir))


def graded_section(data: RunData, figdir: Path) -> Section:
    rows = []
    for v in data.variants:
        recs = list(data.accuracy[v].values())
        for st in _stages(recs):
            rows.append([v, st, *[f"{_mean(r['token_acc'][st][s] for r in recs):.3f} / "
                                  f"{_mean(r['logprob'][st][s] for r in recs):.2f}"
                                  for s in data.sets]])
    return Section("Graded retention", "Teacher-forced token accuracy / mean gold log-prob per "
                   "set after each stage: partial retention that exact match hides.",
                   ["variant", "after", *data.sets], rows, fig_graded(data, figdir))


def lens_sections(data: RunData, figdir: Path) -> list[Section]:
    lens = data.summary.get("lens") or []
    if not lens:
        return [Section("Logit lens", "Not computed: run `factmem analyze RUN_DIR` on a run "
                        "with `output.save_checkpoints: true`.")]
    rows = [[r["variant"], r["seed"], r["stage"], r["set"], f"{r['decodable']}/{r['n']}",
             _num(r["mean"]), _num(r["median"], 1), _num(r["std"]), _num(r["entropy_bits"]),
             r["distinct"],
             f"{_num(r['first_token']['mean'])} / {_num(r['first_token']['entropy_bits'])}"]
            for r in lens]
    text = ("Each layer's residual stream decoded through the final norm and unembedding at the "
            "answer positions. First decodable layer = first layer from which every answer "
            "token stays top-1 to the last layer; spread = sample standard deviation (n − 1) "
            "and entropy of its histogram. Seed `all` pools the facts of every seed. Last "
            "column: the same for the first answer token only.")
    headers = ["variant", "seed", "checkpoint", "set", "decodable", "mean layer", "median",
               "sample std", "entropy (bits)", "distinct layers", "first token: mean / entropy"]
    return [Section("Logit lens", text, headers, rows, fig_lens(data, figdir)),
            Section("First decodable layer", "", figure=fig_first_layer(data, figdir))]


def reversion_section(data: RunData, figdir: Path) -> Section | None:
    rev = list(data.summary.get("reversion") or [])
    if not rev:
        return None
    rows = [_reversion_row(rev, key)
            for key in dict.fromkeys((r["variant"], r["seed"], r["stage"]) for r in rev)]
    block = data.summary.get("block", 1)
    return Section("Layer reversion", "Exact match (%) on a stage's own set with one block of "
                   f"{block} layer{'s' if block > 1 else ''} reverted to its weights before the "
                   "stage.",
                   ["variant", "seed", "stage", "set", "trained", "all reverted",
                    "mean over single blocks", "most harmful block"], rows,
                   fig_reversion(data, figdir))


def _reversion_row(rev: list[dict[str, Any]], key: tuple) -> list[Any]:
    """One (variant, seed, stage): accuracy trained, all reverted, mean over single blocks, and
    the single block whose reversion costs most (none if none costs anything)."""
    v, s, st = key
    mine = [r for r in rev if (r["variant"], r["seed"], r["stage"]) == key]
    layers = [r for r in mine if r["layer_start"] > 0]
    worst = min(layers, key=lambda r: r["accuracy"]) if layers else None
    ref = {r["group"]: r["accuracy"] for r in mine}
    if worst is not None and worst["accuracy"] >= (ref.get("none") or 0):
        worst = None  # no single block costs anything: no block to name
    return [v, s, st, mine[0]["set"], _pct(ref.get("none")), _pct(ref.get("all")),
            _pct(_mean(r["accuracy"] for r in layers)),
            f"{worst['group']} ({_pct(worst['accuracy'])})" if worst else "none"]


def layers_comparison_sections(data: RunData) -> list[Section]:
    """Variants against their baseline in where facts are stored (analysis/compare_layers.py;
    the same tables as analysis/layers_comparison.md)."""
    cl = compare_layers
    lens, rev = data.summary.get(cl.LENS_KEY), data.summary.get(cl.REVERSION_KEY)
    title = "Where facts are stored: variants against their baseline"
    out = []
    if lens is not None:
        out.append(Section(title, cl.LENS_NOTE, cl.LENS_HEADERS, cl.lens_table(lens)))
    if rev is not None:
        out += [Section(f"{title}: layer reversion", cl.REVERSION_NOTE, cl.REVERSION_HEADERS,
                        cl.reversion_table(rev)),
                Section("Largest single-block drop: variants against their baseline", "",
                        cl.DROP_HEADERS, cl.drop_table(rev))]
    return out


def probes_section(data: RunData, figdir: Path) -> Section | None:
    probes = data.summary.get("probes") or []
    if not probes:
        return None
    rows = [[r["variant"], r["seed"], r["stage"], r["set"], r["probe"], _pct(r["accuracy"]),
             _pct(r.get("choice_accuracy"))] for r in probes]
    return Section("Manipulation probes", "Memorized facts asked in changed forms (exact match %; "
                   "multiple choice also scored by likelihood among options).",
                   ["variant", "seed", "checkpoint", "set", "probe", "exact match",
                    "choice by likelihood"], rows, fig_probes(data, figdir))


def to_markdown(data: RunData, secs: Sequence[Section], root: Path) -> str:
    lines = [f"# factmem report: {data.exp.name}", "", data.label, ""]
    for s in secs:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.figure:
            lines += [f"![{s.title}]({s.figure.relative_to(root).as_posix()})", ""]
        if s.headers:
            lines.append("| " + " | ".join(s.headers) + " |")
            lines.append("|" + "---|" * len(s.headers))
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in s.rows]
            lines.append("")
    return "\n".join(lines)


def to_html(data: RunData, secs: Sequence[Section]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             (f"<title>factmem report: {esc(data.exp.name)}</title><style>"
              "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
              "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
              "img{max-width:100%}</style></head><body>"),
             f"<h1>factmem report: {esc(data.exp.name)}</h1><p>{esc(data.label)}</p>"]
    for s in secs:
        parts.append(f"<h2>{esc(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{esc(s.text)}</p>")
        if s.figure:
            b64 = base64.b64encode(s.figure.read_bytes()).decode()
            parts.append(f"<img alt='{esc(s.title)}' src='data:image/png;base64,{b64}'>")
        if s.headers:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in s.headers) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                      for row in s.rows]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    data = load_data(run_dir)
    root = data.root
    secs = sections(data, root / REPORT_FIGURES_DIR)
    md, page = root / REPORT_MD, root / REPORT_HTML
    files.write_text(md, to_markdown(data, secs, root))
    files.write_text(page, to_html(data, secs))
    return md, page
