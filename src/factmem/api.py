"""The Python API, for notebooks and scripts: run an experiment, read a run's results as tables.

    import factmem
    res = factmem.run("configs/demo.yaml", {"seeds": [0, 1]})
    res.accuracy                     # variant, seed, stage, set -> accuracy, token_acc, logprob
    res.matrix("remix")              # stage x set, mean over seeds
    factmem.load_run("runs/demo").forgetting

`run` does what `factmem run` does (same checks, same run directory, continues an interrupted
run) and raises `factmem.errors.FactmemError` on bad input instead of exiting. `load_run` reads
finished and partial runs: a stage appears once it is finished.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factmem.errors import FactmemError

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class RunResults:
    """A run directory's results. Accuracies are fractions (0-1), as in the accuracy record."""

    run_dir: Path
    config: dict[str, dict[str, Any]]
    """variant -> its resolved config (as the run directory holds it)"""
    accuracy: pd.DataFrame
    """one row per variant, seed, stage (base first) and tracked set: accuracy, token_acc,
    logprob, n (and rouge_l, loss for task sets); stages in training order"""
    forgetting: pd.DataFrame
    """one row per finished variant/seed and trained set: accuracy right after the set's own
    stage minus at the end"""
    predictions: pd.DataFrame
    """one row per variant, seed, stage, set and fact: id, prompt, answers, prediction, correct,
    token_acc, logprob (empty if output.save_predictions was off)"""
    summary: dict[str, Any] | None
    """the summary (mean and std over seeds) once the run has finished, else None"""

    def matrix(self, variant: str, seed: int | None = None, value: str = "accuracy"
               ) -> pd.DataFrame:
        """The accuracy matrix of one variant: stage x set, for one seed or the mean over
        seeds."""
        rows = self.accuracy[self.accuracy["variant"] == variant]
        if rows.empty:
            known = ", ".join(self.accuracy["variant"].unique()) or "none"
            raise FactmemError(f"no results for variant {variant!r} (have: {known})")
        if seed is not None:
            rows = rows[rows["seed"] == seed]
        stages = list(dict.fromkeys(rows["stage"]))
        table = rows.pivot_table(index="stage", columns="set", values=value, aggfunc="mean")
        return table.reindex(stages)


def run(config: str | Path | Mapping[str, Any],
        overrides: Sequence[str] | Mapping[str, Any] | None = None, *,
        output_dir: str | Path | None = None, restart: bool = False,
        progress: bool = True) -> RunResults:
    """Run an experiment as `factmem run` does and return its results.

    `config`: a YAML path or the config as a dict. `overrides`: dotted keys, as `--set` takes
    them (`["train.lr=5e-5"]`) or as a mapping (`{"train.lr": 5e-5, "seeds": [0]}`); a mapping
    value merges into the section key by key, a `factmem.config.Replace` replaces it.
    `restart`: discard an existing run directory (`--restart`); without it, an interrupted run
    continues and a changed config is refused."""
    from factmem.config import Replace, experiment_from_dict, load_experiment
    from factmem.experiment import run_experiment

    texts = [f"{k}={'!replace ' if isinstance(v, Replace) else ''}{json.dumps(v)}"
             for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(
        overrides or [])  # JSON is YAML: values keep their types
    if isinstance(config, Mapping):
        exp = experiment_from_dict(dict(config), texts)
    else:
        exp = load_experiment(config, texts)
    summary = run_experiment(exp, output_dir=None if output_dir is None else str(output_dir),
                             overwrite=restart, progress=progress)
    return load_run(summary["run_dir"])


def load_run(run_dir: str | Path) -> RunResults:
    """Read a run directory written by `factmem run` (finished or not) into tables."""
    import pandas as pd

    from factmem.rundir import RESOLVED_FILE, SUMMARY_FILE, RunPaths, open_run, read_json

    root, exp = open_run(run_dir)
    paths = RunPaths(root)
    acc_rows: list[dict[str, Any]] = []
    forget_rows: list[dict[str, Any]] = []
    pred_rows: list[dict[str, Any]] = []
    for variant, cfg in exp.variants.items():
        for seed in cfg.seeds:
            key = {"variant": variant, "seed": seed}
            _seed_rows(cfg, paths.seed_dir(variant, seed), key, acc_rows, forget_rows, pred_rows)
    resolved = root / RESOLVED_FILE
    summary = root / SUMMARY_FILE
    return RunResults(
        run_dir=root,
        config=read_json(resolved) if resolved.is_file() else {},
        accuracy=pd.DataFrame(acc_rows, columns=_columns(acc_rows, ["variant", "seed", "stage",
                                                                   "set", "accuracy"])),
        forgetting=pd.DataFrame(forget_rows, columns=["variant", "seed", "set", "forgetting"]),
        predictions=pd.DataFrame(pred_rows, columns=_columns(pred_rows, [
            "variant", "seed", "stage", "set", "id", "prediction", "correct"])),
        summary=read_json(summary) if summary.is_file() else None,
    )


def _seed_rows(cfg, seed_dir: Path, key: dict[str, Any], acc_rows: list, forget_rows: list,
              pred_rows: list) -> None:
    """One variant/seed's rows: figures and predictions of its finished stages, forgetting
    once it is finished."""
    from factmem.rundir import (
        finished_stage_dirs,
        is_seed_finished,
        predictions_file,
        read_accuracy,
        read_eval,
        read_jsonl,
    )

    for stage, _, stage_dir in finished_stage_dirs(cfg, seed_dir):
        for name, m in read_eval(stage_dir).items():
            acc_rows.append({**key, "stage": stage, "set": name, **m})
        for name in cfg.track:
            path = predictions_file(stage_dir, name)
            if path.is_file():
                pred_rows += [{**key, "stage": stage, "set": name, **p}
                              for p in read_jsonl(path)]
    if is_seed_finished(seed_dir):
        record = read_accuracy(seed_dir)
        forget_rows += [{**key, "set": s, "forgetting": f} for s, f in record["forgetting"].items()]


def _columns(rows: list[dict[str, Any]], first: list[str]) -> list[str]:
    """The leading columns, then every other key in order of appearance (empty tables keep
    their leading columns)."""
    return list(dict.fromkeys([*first, *(k for r in rows for k in r)]))
