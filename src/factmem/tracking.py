"""Experiment tracking through accelerate's trackers: `output.report_to: [tensorboard]` (or
wandb, mlflow, trackio, where installed).

One tracking run per variant and seed, named EXPERIMENT/VARIANT/seedS, with the resolved config
as its hyperparameters. Steps are optimizer steps counted across the stages of that variant and
seed (stage 2's first step follows stage 1's last), so the stages' curves line up:

    train/loss, train/lr, train/tok_acc, train/epoch, train/stage    every optimizer step
    train/memorized_accuracy                      every epoch of an `until_memorized` stage
    retention/SET/exact_match, retention/SET/token_acc      every retention point
                                                  (eval.retention_every; step 0 of a stage too)
    eval/SET/accuracy, eval/SET/token_acc         after every stage (step 0: before training)

Only the main process logs. TensorBoard writes under RUN_DIR/tensorboard/ (point `tensorboard
--logdir` there). A stage copied from an identical one of another variant (stage reuse) is logged
from its copied files; a run continued after an interruption logs from where it continues.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factmem import rundir
from factmem.errors import ConfigError
from factmem.train.loop import StageCallback, StageContext

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
TENSORBOARD_DIR = "tensorboard"


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before the run, a tracker that is named but not installed."""
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in installed:
            have = ", ".join(t for t in TRACKERS if t in installed) or "none"
            raise ConfigError(f"output.report_to: {name!r} is not installed (pip install {name}); "
                              f"installed trackers: {have}")


def hyperparameters(config: dict[str, Any], variant: str, seed: int) -> dict[str, Any]:
    """The resolved config flattened to dotted keys with scalar values (lists as JSON text),
    which every tracker accepts."""
    out: dict[str, Any] = {"variant": variant, "seed": seed}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:  # lists, None
            out[prefix] = json.dumps(value, default=str)

    walk("", {k: v for k, v in config.items() if k != "variants"})
    return out


def _make(name: str, experiment: str, run_name: str, root: Path):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(run_name, root / TENSORBOARD_DIR)
    if name == "wandb":  # accelerate passes its run name to wandb as the project
        return WandBTracker(experiment, name=run_name)
    if name == "mlflow":
        return MLflowTracker(experiment_name=experiment, run_name=run_name)
    if name == "trackio":
        return TrackioTracker(experiment, name=run_name)
    raise ConfigError(f"output.report_to: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")


class RunTracker:
    """The trackers of one variant and seed. A no-op without `report_to` or off the main process
    (`enabled` false), so callers never branch on it."""

    def __init__(self, names: Sequence[str], root: Path, experiment: str, variant: str, seed: int,
                 config: dict[str, Any], enabled: bool = True):
        self.trackers: list[Any] = []
        self.run_name = f"{experiment}/{variant}/seed{seed}"
        if not enabled:
            return
        for name in names:
            tracker = _make(name, experiment, self.run_name, root)
            tracker.start()
            tracker.store_init_configuration(hyperparameters(config, variant, seed))
            self.trackers.append(tracker)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_eval(self, row: dict[str, dict[str, float]], step: int) -> None:
        """A stage's accuracy row (set -> summarize() figures)."""
        self.log(eval_values(row), step)

    def log_step(self, row: dict[str, Any], step: int, stage_index: int) -> None:
        self.log(step_values(row, stage_index), step)

    def log_retention(self, rows: Sequence[dict[str, Any]], offset: int) -> None:
        for step, values in retention_values(rows):
            self.log(values, offset + step)

    def log_stage_files(self, stage_dir: Path, stage_index: int, offset: int) -> int:
        """Log a stage that was copied, not trained, from its files; returns its steps. Events
        go out in step order (wandb drops a step lower than one it has seen)."""
        events = [(offset + row["step"], step_values(row, stage_index))
                  for row in rundir.read_jsonl(stage_dir / rundir.TRAIN_LOG_FILE)]
        if (stage_dir / rundir.RETENTION_FILE).is_file():
            events += [(offset + step, values) for step, values
                       in retention_values(rundir.read_jsonl(stage_dir / rundir.RETENTION_FILE))]
        metrics = rundir.read_metrics(stage_dir)
        steps = int(metrics["train"]["steps"])
        events.append((offset + steps, eval_values(metrics["eval"])))
        for step, values in sorted(events, key=lambda e: e[0]):  # stable: same-step order kept
            self.log(values, step)
        return steps

    def callback(self, stage_index: int, offset: int, retention: Any = None) -> StageCallback:
        if not self.active:
            return StageCallback()  # nothing to log: no per-step work at all
        return TrackingCallback(self, stage_index, offset, retention)

    def finish(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as e:  # noqa: BLE001 - a tracker failing to close loses no results
                log.warning("%s: tracker %s did not close cleanly: %s", self.run_name,
                            type(tracker).__name__, e)
        self.trackers = []


def step_values(row: dict[str, Any], stage_index: int) -> dict[str, float]:
    """An optimizer step's log row -> scalars (with the memorization check of its epoch, which
    the loop adds to the epoch's last row)."""
    out = {"train/loss": row["loss"], "train/lr": row["lr"], "train/tok_acc": row["tok_acc"],
           "train/epoch": row["epoch"], "train/stage": stage_index + 1}
    if "memorized_accuracy" in row:
        out["train/memorized_accuracy"] = row["memorized_accuracy"]
    return out


def eval_values(row: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{s}/{k}": m[k] for s, m in row.items() for k in ("accuracy", "token_acc")
            if k in m}


def retention_values(rows: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Retention rows (one per step, set and fact) -> per step: each set's exact match and
    token accuracy over its facts."""
    groups: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault(r["step"], {}).setdefault(r["set"], []).append(r)
    out = []
    for step in sorted(groups):
        values: dict[str, float] = {}
        for name, facts in groups[step].items():
            values[f"retention/{name}/exact_match"] = sum(bool(f["correct"]) for f in facts) / len(
                facts)
            values[f"retention/{name}/token_acc"] = sum(f["token_acc"] for f in facts) / len(facts)
        out.append((step, values))
    return out


class TrackingCallback(StageCallback):
    """Per-step logging of a running stage. Goes after the retention callback, whose rows it
    reads (`retention`: a RetentionCallback, or None)."""

    def __init__(self, tracker: RunTracker, stage_index: int, offset: int, retention: Any = None):
        self.tracker, self.stage_index, self.offset = tracker, stage_index, offset
        self.retention = retention
        self._retention_rows = 0  # rows of `retention` already logged

    def _flush_retention(self) -> None:
        if self.retention is None:
            return
        rows = self.retention.rows[self._retention_rows:]
        self._retention_rows = len(self.retention.rows)
        self.tracker.log_retention(rows, self.offset)

    def on_stage_start(self, ctx: StageContext) -> None:
        self._flush_retention()

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        self.tracker.log_step(row, self.offset + ctx.step, self.stage_index)
        self._flush_retention()

    def on_epoch_end(self, ctx: StageContext) -> None:  # the check runs after the last step
        last = ctx.log[-1] if ctx.log else {}
        if "memorized_accuracy" in last:  # set by the loop after the epoch's memorization check
            self.tracker.log({"train/memorized_accuracy": last["memorized_accuracy"]},
                             self.offset + ctx.step)

    def on_stage_end(self, ctx: StageContext) -> None:
        self._flush_retention()
