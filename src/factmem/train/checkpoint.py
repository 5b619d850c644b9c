"""In-stage checkpoints: an interrupted stage continues from where it was.

Every output.checkpoint_every optimizer steps the whole training state is saved into the
stage's `resume/step-NNNNNN/`: model weights, optimizer and scheduler state, RNG states, data
order (epoch + batches done; batches are a function of seed and epoch), stop-rule counters and
the step log. The outcome of a resumed stage equals an uninterrupted run bit for bit on CPU.
A checkpoint directory is complete once its `state.json` exists (written last, atomically).

Under FSDP (factmem.distributed) the same directories hold shards instead: `model/` and
`optimizer/` with one safetensors file per rank written by torch.distributed.checkpoint,
`rank-0000R.json` with each rank's RNG states, and rank 0's `state.json` with `"format":
"sharded"` and the process count, written last once every rank has written its part
(factmem.rundir.write_sharded, shared with the weights kept after a stage).

After a stage, `save_pretrained_dir` writes the model as a Hugging Face directory (with
output.save_checkpoints), for the analyses and for use elsewhere.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from factmem import distributed as dist
from factmem import files, signals
from factmem.errors import FactmemError
from factmem.rundir import (
    MODEL_WEIGHTS,
    OPTIMIZER_WEIGHTS,
    SHARDED_MODEL_DIR,
    SHARDED_OPTIMIZER_DIR,
    STATE_FILE,
    STEP_PREFIX,
    host_rng_state,
    rank_rng_state,
    read_json,
    reading,
    set_host_rng_state,
    write_sharded,
)
from factmem.train.loop import ResumePoint, StageCallback, StageContext

log = logging.getLogger(__name__)


class StageCheckpointer(StageCallback):
    """Saves the whole training state every `every` optimizer steps into `dir/step-NNNNNN/` and,
    at stage start, restores the latest complete one. Only the newest is kept. `write` is False
    on processes other than the main one (they restore but do not write)."""

    def __init__(self, dir: Path, every: int | None, write: bool = True):
        self.dir = dir
        self.every = every
        self.write = write
        self.restored_step: int | None = None
        self.saved: tuple[int, Path] | None = None  # (step, directory) of the latest save

    # saving ------------------------------------------------------------------------------
    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        if self.every and ctx.step % self.every == 0:
            self.save(ctx)

    def save(self, ctx: StageContext, extra: dict[str, Any] | None = None) -> Path:
        path = self.dir / f"{STEP_PREFIX}{ctx.step:06d}"
        if dist.is_sharded(ctx.model):
            return self._save_sharded(ctx, path, extra)
        if not self.write:
            return path
        tmp = self.dir / f".{path.name}.tmp{os.getpid()}"
        with files.atomic_dir(path, tmp) as tmp:
            model = ctx.accelerator.unwrap_model(ctx.model)
            save_model(model, str(tmp / MODEL_WEIGHTS))
            tensors, opt_state = split_optimizer_state(ctx.optimizer.state_dict())
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(tmp / OPTIMIZER_WEIGHTS))
            state = {**training_state(ctx), "optimizer": opt_state, "rng": host_rng_state(),
                     **(extra or {})}
            # allow_nan: a NaN loss row is recorded as such
            files.write_json(tmp / STATE_FILE, state)
        self._keep_only(path)
        self.saved = (ctx.step, path)
        return path

    def _keep_only(self, path: Path) -> None:
        for old in self.dir.glob(f"{STEP_PREFIX}*"):  # only the newest complete one is kept
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def _save_sharded(self, ctx: StageContext, path: Path, extra: dict[str, Any] | None) -> Path:
        """FSDP: every rank writes its shards of the weights and AdamW moments and its RNG
        states; rank 0 the rest (no gather, nothing pickled)."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)  # accelerate's wrapper
        opt_tensors, opt_state = dist.optimizer_state(model, optimizer)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_sharded(path, {SHARDED_MODEL_DIR: dist.model_tensors(model),
                             SHARDED_OPTIMIZER_DIR: opt_tensors},
                      {**training_state(ctx), "optimizer": opt_state, **(extra or {})})
        if dist.rank() == 0:
            self._keep_only(path)
        self.saved = (ctx.step, path)
        return path

    # restoring ---------------------------------------------------------------------------
    def latest(self) -> Path | None:
        done = sorted(p for p in self.dir.glob(f"{STEP_PREFIX}*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def on_stage_start(self, ctx: StageContext) -> None:
        sharded = dist.is_sharded(ctx.model)
        path = self.latest()
        if sharded:  # every rank restores the checkpoint rank 0 sees
            name = dist.broadcast_from_main(path.name if path else None)
            path = self.dir / name if name else None
        if path is None:
            return
        state = read_json(path / STATE_FILE)  # damaged: one line, naming what to delete
        check_format(path, state, sharded)
        if sharded:
            _load_sharded(ctx, path, state)
        else:
            _load_whole(ctx, path, state)
        ctx.scheduler.load_state_dict(state["scheduler"])
        for k, v in state["rule"].items():
            setattr(ctx.rule.state, k, v)
        ctx.step = state["step"]
        ctx.log[:] = state["log"]
        mem = [r["epoch"] for r in ctx.log if r.get("memorized_accuracy", 0.0) >= 1.0]
        ctx.resume = ResumePoint(epoch=state["epoch"], position=state["position"],
                                 tokens=state["tokens"], memorized_epoch=min(mem) if mem else None,
                                 loss=state["loss"], seconds=recorded_seconds(state))
        self.restored_step = state["step"]
        log.info("resuming from %s (epoch %d, %d batches done, step %d)", path, state["epoch"],
                 state["position"], state["step"])

    def clear(self) -> None:
        """The stage is finished: its in-stage checkpoints are no longer needed."""
        if self.write:
            for p in [*self.dir.glob(f"{STEP_PREFIX}*"), *self.dir.glob(f".{STEP_PREFIX}*")]:
                shutil.rmtree(p, ignore_errors=True)


class CheckpointOnSigterm(StageCallback):
    """While the stage's steps run, a SIGTERM waits for the step's end (factmem.signals). There,
    if one came: save a resumable checkpoint (unless the periodic one was just taken; also when
    `checkpoint_every` is null: the stop is what it is for) and stop the run. Last in the
    callback list, so that every other callback has seen the step (a resumed stage does not run
    it again). Under several processes they agree first, so that all stop at the same step
    (under FSDP the save is collective)."""

    def __init__(self, checkpointer: StageCheckpointer):
        self.checkpointer = checkpointer

    def on_stage_start(self, ctx: StageContext) -> None:
        signals.training_starts()

    def on_stage_end(self, ctx: StageContext) -> None:
        signals.training_ends()

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        stop = signals.requested()
        if dist.world_size() > 1:
            stop = dist.any_rank(stop, ctx.accelerator.device)
        if not stop:
            return
        saved = self.checkpointer.saved
        path = saved[1] if saved and saved[0] == ctx.step else self.checkpointer.save(ctx)
        raise signals.Terminated(f"the training state at step {ctx.step} is saved in {path}")


def training_state(ctx: StageContext) -> dict[str, Any]:
    """Everything but tensors and RNG states: the same JSON in both formats."""
    return {
        "step": ctx.step, "epoch": ctx.epoch, "position": ctx.position, "tokens": ctx.tokens,
        "seconds": round(ctx.seconds(), 2),  # training time so far, so that a resume adds to it
        "loss": ctx.log[-1]["loss"] if ctx.log else float("nan"),
        "rule": dict(ctx.rule.state.__dict__),
        "scheduler": ctx.scheduler.state_dict(),
        "log": ctx.log,
    }


def _load_whole(ctx: StageContext, path: Path, state: dict[str, Any]) -> None:
    with reading(path / MODEL_WEIGHTS):
        load_model(ctx.accelerator.unwrap_model(ctx.model), str(path / MODEL_WEIGHTS))
    with reading(path / OPTIMIZER_WEIGHTS):
        tensors = load_file(str(path / OPTIMIZER_WEIGHTS))
    torch.set_rng_state(tensors.pop("rng.torch"))
    ctx.optimizer.load_state_dict(join_optimizer_state(tensors, state["optimizer"]))
    set_host_rng_state(state["rng"])


def _load_sharded(ctx: StageContext, path: Path, state: dict[str, Any]) -> None:
    model = ctx.accelerator.unwrap_model(ctx.model)
    optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    dist.load_sharded(dist.model_tensors(model), path / SHARDED_MODEL_DIR)
    dist.load_optimizer_state(model, optimizer, path / SHARDED_OPTIMIZER_DIR, state["optimizer"])
    dist.set_rng_state(rank_rng_state(path))


def recorded_seconds(state: dict[str, Any]) -> float:
    """The training seconds a checkpoint's stage had run (0 where it predates the field: the
    time is then not known, and a resumed stage counts only its own)."""
    seconds = state.get("seconds")
    valid = (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
             and math.isfinite(seconds) and seconds >= 0)
    return float(seconds) if valid else 0.0


def check_format(path: Path, state: dict[str, Any], sharded: bool) -> None:
    """A checkpoint resumes in the setting that wrote it: sharded with as many processes, or
    whole. (Stage weights are portable; an in-stage checkpoint also holds per-rank state.)"""
    written = state.get("world_size") if state.get("format") == "sharded" else None
    if sharded and written == dist.world_size():
        return
    if not sharded and written is None:
        return
    was = f"FSDP with {written} processes" if written else "without FSDP"
    now = f"FSDP with {dist.world_size()} processes" if sharded else "without FSDP"
    raise FactmemError(f"{path} was written {was} and this run is {now}; run it as before, or "
                       f"delete {path.parent} to restart that stage from its beginning")


def split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors for safetensors, the rest as JSON-able data)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, st in rest["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_pretrained_dir(model, tokenizer, path: Path, write: bool = True) -> None:
    """A Hugging Face model directory (loads with from_pretrained), written atomically. A sharded
    model is gathered one tensor at a time by every process and written by rank 0; otherwise the
    process where `write` is true writes it."""
    sharded = dist.is_sharded(model)
    if not (write or sharded):
        return
    main = dist.rank() == 0 if sharded else True
    # one temporary name for every process (sharded: they all write into it)
    with files.atomic_dir(path, path.with_name(path.name + ".tmp"), main=main,
                       barrier=dist.barrier if sharded else None) as tmp:
        if sharded:
            dist.save_pretrained_gathered(model, tokenizer, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
