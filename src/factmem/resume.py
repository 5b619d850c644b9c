"""Crash safety: resume an interrupted run, one writer per run directory, non-finite losses.

A run killed at any moment (SIGKILL included) continues when the same command is run again:
- a variant/seed is finished when its `accuracy.json` exists (skipped, its record is read back);
- a stage is finished when its `metrics.json` exists; the model after the last finished stage is
  kept as safetensors (`resume/final/`, or `checkpoint/` with output.save_checkpoints) until the
  variant/seed is finished, then deleted;
- an unfinished stage continues from its last in-stage checkpoint (`resume/step-NNNNNN/`, every
  output.checkpoint_every optimizer steps): model weights, optimizer and scheduler state, RNG
  states, data order (epoch + batches done; batches are a function of seed and epoch), stop-rule
  counters and the step log. The outcome equals an uninterrupted run bit for bit on CPU.

Tensors are written with safetensors and everything else as JSON: nothing is ever unpickled.
A checkpoint directory is complete once its `state.json` exists (written last, atomically).

Under FSDP (factmem.distributed) the same directories hold shards instead: `model/` (and
`optimizer/`) with one safetensors file per rank written by torch.distributed.checkpoint,
`rank-0000R.json` with each rank's RNG states, and rank 0's `state.json` with `"format":
"sharded"` and the process count, written last once every rank has written its part.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from factmem import distributed as dist
from factmem import io
from factmem.errors import FactmemError
from factmem.train.loop import ResumePoint, StageCallback, StageContext

log = logging.getLogger(__name__)

STATE = "state.json"
# Settings that change how a run is carried out but not what it computes: may differ on resume.
OPERATIONAL_KEYS = ("output.checkpoint_every", "output.report_to")


class NumericalError(FactmemError):
    """A non-finite loss or gradient: training cannot go on from this state."""


# --------------------------------------------------------------------------------------------
# One writer per run directory


class RunLock:
    """`<parent>/.<run>.lock` created with O_CREAT|O_EXCL, holding `pid@host`. A lock whose
    process is gone (same host, pid not alive) is stale and taken over. It sits beside the run
    directory so that --overwrite can delete the directory while holding it."""

    def __init__(self, root: Path):
        self.path = root.parent / f".{root.name}.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()}@{socket.gethostname()}"
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not _alive(owner):
                    log.warning("removing stale lock %s (process %s is gone)", self.path, owner)
                    self.path.unlink(missing_ok=True)
                    continue
                raise FactmemError(
                    f"run directory {self.path.parent / self.path.name[1:-5]} is in use by process "
                    f"{owner or '?'} (lock {self.path}); wait for it to finish, or delete the lock "
                    "file if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return
        raise FactmemError(f"cannot take the lock {self.path}")

    def _owner(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _alive(owner: str) -> bool:
    """Whether `pid@host` names a running process (a lock from another host counts as alive:
    its process cannot be checked from here)."""
    pid_text, _, host = owner.partition("@")
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --------------------------------------------------------------------------------------------
# Same config or refuse


def diff_keys(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in old or k not in new:
                out.append(sub)
            else:
                out += diff_keys(old[k], new[k], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new))
                for k in diff_keys(a, b, f"{path}.{i}" if path else str(i))]
    return [] if old == new else [path or "(whole config)"]


def check_resumable(root: Path, raw: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Refuse to continue in `root` unless it is a factmem run of the same config. Compares the
    config as given (keys the user wrote) and, failing that, every resolved variant."""
    saved = root / "resolved.json"
    if not saved.is_file() and not (root / "config.yaml").is_file():
        raise FactmemError(f"run directory {root} exists and is not a factmem run; pass "
                           "--overwrite to start over or --output DIR to write elsewhere")
    old_raw = _load_yaml(root / "config.yaml")
    keys = [k for k in diff_keys(old_raw, raw) if not k.startswith(OPERATIONAL_KEYS)]
    if not keys and saved.is_file():  # (killed between writing the two files: raw only)
        old = io.read_json(saved)
        keys = [k for k in diff_keys(old, resolved)
                if not k.split(".", 1)[-1].startswith(OPERATIONAL_KEYS)]
    if keys:
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise FactmemError(f"run directory {root} holds a different config (changed: {shown}); "
                           "pass --restart to start over or --output DIR to write elsewhere")


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


# --------------------------------------------------------------------------------------------
# Model after a finished stage


def save_stage_weights(model, path: Path, write: bool = True) -> None:
    """Model weights + torch RNG state after a stage, written to a temporary directory and
    renamed into place. A sharded model is saved by every rank (each writes its shard);
    otherwise only where `write` is true (the main process)."""
    if dist.is_sharded(model):
        write_sharded(path, {"model": dist.model_tensors(model)}, {})
        return
    if not write:
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    io.write_json(tmp / STATE, {"rng": _host_rng_state()})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_stage_weights(model, path: Path) -> None:
    """Load weights saved by `save_stage_weights`, either format, into `model` (whole or
    sharded: a sharded save loads into a whole model too, on any process count)."""
    if dist.is_sharded_dir(path / "model"):
        dist.load_sharded(dist.model_tensors(model), path / "model")
        dist.set_rng_state(_rank_file(path))
        return
    load_model(model, str(path / "model.safetensors"))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    _set_host_rng_state(io.read_json(path / STATE)["rng"])


def has_stage_weights(path: Path) -> bool:
    return (path / STATE).is_file() and ((path / "model.safetensors").is_file()
                                         or dist.is_sharded_dir(path / "model"))


def write_sharded(path: Path, parts: dict[str, dict[str, torch.Tensor]],
                  state: dict[str, Any]) -> None:
    """A sharded directory, atomically: every rank writes its shard of each part
    (`path/PART/`) and its RNG states (`rank-0000R.json`) into a temporary directory; once all
    have, rank 0 writes `state.json` and renames the directory into place. A collective."""
    tmp = path.with_name(f".{path.name}.tmp")
    main = dist.rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    for name, tensors in parts.items():
        dist.save_sharded(tensors, tmp / name)
    dist.write_rank_file(tmp, dist.rng_state())
    dist.barrier()
    if main:
        io.write_json(tmp / STATE, {"format": "sharded", "world_size": dist.world_size(),
                                    **state})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def _rank_file(path: Path) -> dict[str, Any]:
    """This rank's RNG states; rank 0's when the directory was written by fewer processes."""
    mine = path / dist.RANK_FILE.format(rank=dist.rank())
    return io.read_json(mine if mine.is_file() else path / dist.RANK_FILE.format(rank=0))


def _host_rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_host_rng_state(s: dict[str, Any]) -> None:
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------
# In-stage checkpoints


class StageCheckpointer(StageCallback):
    """Saves the whole training state every `every` optimizer steps into `dir/step-NNNNNN/` and,
    at stage start, restores the latest complete one. Only the newest is kept. `write` is False
    on processes other than the main one (they restore but do not write)."""

    def __init__(self, dir: Path, every: int | None, write: bool = True):
        self.dir = dir
        self.every = every
        self.write = write
        self.restored_step: int | None = None

    # saving ------------------------------------------------------------------------------
    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        if self.every and ctx.step % self.every == 0:
            self.save(ctx)

    def save(self, ctx: StageContext, extra: dict[str, Any] | None = None) -> Path:
        path = self.dir / f"step-{ctx.step:06d}"
        if dist.is_sharded(ctx.model):
            return self._save_sharded(ctx, path, extra)
        if not self.write:
            return path
        tmp = self.dir / f".step-{ctx.step:06d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = ctx.accelerator.unwrap_model(ctx.model)
        save_model(model, str(tmp / "model.safetensors"))
        opt = ctx.optimizer.state_dict()
        tensors, opt_state = _split_optimizer_state(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": ctx.step, "epoch": ctx.epoch, "position": ctx.position, "tokens": ctx.tokens,
            "loss": ctx.log[-1]["loss"] if ctx.log else float("nan"),
            "rule": dict(ctx.rule.state.__dict__),
            "optimizer": opt_state,
            "scheduler": ctx.scheduler.state_dict(),
            "rng": _host_rng_state(),
            "log": ctx.log,
            **(extra or {}),
        }
        io.write_json(tmp / STATE, state)  # allow_nan: a NaN loss row is recorded as such
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        self._keep_only(path)
        return path

    def _keep_only(self, path: Path) -> None:
        for old in self.dir.glob("step-*"):  # only the newest complete checkpoint is kept
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def _training_state(self, ctx: StageContext) -> dict[str, Any]:
        """Everything but tensors and RNG states: the same JSON in both formats."""
        return {
            "step": ctx.step, "epoch": ctx.epoch, "position": ctx.position, "tokens": ctx.tokens,
            "loss": ctx.log[-1]["loss"] if ctx.log else float("nan"),
            "rule": dict(ctx.rule.state.__dict__),
            "scheduler": ctx.scheduler.state_dict(),
            "log": ctx.log,
        }

    def _save_sharded(self, ctx: StageContext, path: Path, extra: dict[str, Any] | None) -> Path:
        """FSDP: every rank writes its shards of the weights and AdamW moments and its RNG
        states; rank 0 the rest (no gather, nothing pickled)."""
        model = ctx.accelerator.unwrap_model(ctx.model)
        optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)  # accelerate's wrapper
        opt_tensors, opt_state = dist.optimizer_state(model, optimizer)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_sharded(path, {"model": dist.model_tensors(model), "optimizer": opt_tensors},
                      {**self._training_state(ctx), "optimizer": opt_state, **(extra or {})})
        if dist.rank() == 0:
            self._keep_only(path)
        return path

    # restoring ---------------------------------------------------------------------------
    def latest(self) -> Path | None:
        done = sorted(p for p in self.dir.glob("step-*") if (p / STATE).is_file())
        return done[-1] if done else None

    def on_stage_start(self, ctx: StageContext) -> None:
        sharded = dist.is_sharded(ctx.model)
        path = self.latest()
        if sharded:  # every rank restores the checkpoint rank 0 sees
            name = dist.broadcast_from_main(path.name if path else None)
            path = self.dir / name if name else None
        if path is None:
            return
        state = io.read_json(path / STATE)
        model = ctx.accelerator.unwrap_model(ctx.model)
        _check_format(path, state, sharded)
        if sharded:
            optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
            dist.load_sharded(dist.model_tensors(model), path / "model")
            dist.load_optimizer_state(model, optimizer, path / "optimizer", state["optimizer"])
            dist.set_rng_state(_rank_file(path))
        else:
            load_model(model, str(path / "model.safetensors"))
            tensors = load_file(str(path / "optimizer.safetensors"))
            torch.set_rng_state(tensors.pop("rng.torch"))
            ctx.optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
            _set_host_rng_state(state["rng"])
        ctx.scheduler.load_state_dict(state["scheduler"])
        for k, v in state["rule"].items():
            setattr(ctx.rule.state, k, v)
        ctx.step = state["step"]
        ctx.log[:] = state["log"]
        mem = [r["epoch"] for r in ctx.log if r.get("memorized_accuracy", 0.0) >= 1.0]
        ctx.resume = ResumePoint(epoch=state["epoch"], position=state["position"],
                                 tokens=state["tokens"], memorized_epoch=min(mem) if mem else None,
                                 loss=state["loss"])
        self.restored_step = state["step"]
        log.info("resuming from %s (epoch %d, %d batches done, step %d)", path, state["epoch"],
                 state["position"], state["step"])

    def clear(self) -> None:
        """The stage is finished: its in-stage checkpoints are no longer needed."""
        if self.write:
            for p in list(self.dir.glob("step-*")) + list(self.dir.glob(".step-*")):
                shutil.rmtree(p, ignore_errors=True)


def _check_format(path: Path, state: dict[str, Any], sharded: bool) -> None:
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


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, st in rest["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------
# Non-finite losses


class FiniteGuard(StageCallback):
    """Stops the stage before an optimizer step whose gradients are not finite (a NaN or
    infinite loss). The state before that step is still intact: it is saved as a resumable
    checkpoint, with the offending batch's example ids in `nonfinite.json` beside it.

    A non-finite loss whose gradients stayed finite is caught after the step (the state is then
    already changed): the stage stops pointing at the last periodic checkpoint. Put the guard
    before the checkpointer in the callback list, so that this state is never saved."""

    def __init__(self, checkpointer: StageCheckpointer, where: str = "stage"):
        self.checkpointer = checkpointer
        self.where = where

    def on_before_optimizer_step(self, ctx: StageContext) -> None:
        if ctx.grad_norm is not None:  # the loop's total norm: non-finite iff a gradient is
            # (the global norm: under FSDP every rank reads the same value and all stop, or none)
            bad = not bool(torch.isfinite(dist.full(ctx.grad_norm)))
        else:
            model = ctx.accelerator.unwrap_model(ctx.model)
            grads = [dist.local(p.grad) for p in model.parameters() if p.grad is not None]
            bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all()
                                                        for g in grads]).all())
            if dist.is_sharded(model):  # each rank sees its shards: all stop, or none
                bad = dist.any_rank(bad, ctx.accelerator.device)
        if not bad:
            return
        record = {"step": ctx.step + 1, "epoch": ctx.epoch, "batch": ctx.position + 1,
                  "batch_ids": ctx.batch_ids, "last_good_step": ctx.step}
        path = self.checkpointer.save(ctx, {"nonfinite": record})
        if self.checkpointer.write:
            io.write_json(self.checkpointer.dir / "nonfinite.json",
                          {**record, "checkpoint": str(path)})
        raise NumericalError(self._message(ctx.step + 1, ctx.epoch, ctx.position + 1,
                                           ctx.batch_ids, f"the state before that step is saved "
                                           f"in {path}"))

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        if math.isfinite(row["loss"]):
            return
        last = self.checkpointer.latest()
        record = {"step": ctx.step, "epoch": ctx.epoch, "batch": ctx.position,
                  "batch_ids": ctx.batch_ids, "last_good_step": last and int(last.name[5:])}
        if self.checkpointer.write:
            io.write_json(self.checkpointer.dir / "nonfinite.json",
                          {**record, "checkpoint": last and str(last)})
        where = f"the last checkpoint is {last}" if last else "no checkpoint was saved before it"
        raise NumericalError(self._message(ctx.step, ctx.epoch, ctx.position, ctx.batch_ids, where))

    def _message(self, step: int, epoch: int, batch: int, batch_ids: list[str], saved: str) -> str:
        ids = ", ".join(batch_ids[:5]) + (" ..." if len(batch_ids) > 5 else "")
        return (f"{self.where}: non-finite loss or gradient at step {step} (epoch {epoch}, "
                f"batch {batch}: {ids}); {saved} (details in "
                f"{self.checkpointer.dir / 'nonfinite.json'}); lower train.lr or check these "
                "items, then run again with --restart")
