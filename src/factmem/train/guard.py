"""The non-finite guard: a NaN or infinite loss stops the stage with a resumable checkpoint
and the offending batch named, instead of training on from a broken state."""

from __future__ import annotations

import math
from typing import Any

import torch

from factmem import distributed as dist
from factmem import files
from factmem.errors import FactmemError
from factmem.rundir import NONFINITE_FILE, STEP_PREFIX
from factmem.train.checkpoint import StageCheckpointer
from factmem.train.loop import StageCallback, StageContext


class NumericalError(FactmemError):
    """A non-finite loss or gradient: training cannot go on from this state."""


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
            files.write_json(self.checkpointer.dir / NONFINITE_FILE,
                          {**record, "checkpoint": str(path)})
        raise NumericalError(self._message(ctx.step + 1, ctx.epoch, ctx.position + 1,
                                           ctx.batch_ids, f"the state before that step is saved "
                                           f"in {path}"))

    def on_step_end(self, ctx: StageContext, row: dict[str, Any]) -> None:
        if math.isfinite(row["loss"]):
            return
        last = self.checkpointer.latest()
        record = {"step": ctx.step, "epoch": ctx.epoch, "batch": ctx.position,
                  "batch_ids": ctx.batch_ids,
                  "last_good_step": last and int(last.name[len(STEP_PREFIX):])}
        if self.checkpointer.write:
            files.write_json(self.checkpointer.dir / NONFINITE_FILE,
                          {**record, "checkpoint": last and str(last)})
        where = f"the last checkpoint is {last}" if last else "no checkpoint was saved before it"
        raise NumericalError(self._message(ctx.step, ctx.epoch, ctx.position, ctx.batch_ids, where))

    def _message(self, step: int, epoch: int, batch: int, batch_ids: list[str], saved: str) -> str:
        ids = ", ".join(batch_ids[:5]) + (" ..." if len(batch_ids) > 5 else "")
        return (f"{self.where}: non-finite loss or gradient at step {step} (epoch {epoch}, "
                f"batch {batch}: {ids}); {saved} (details in "
                f"{self.checkpointer.dir / NONFINITE_FILE}); lower train.lr or check these "
                "items, then run again with --restart")
