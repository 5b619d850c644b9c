"""Stop rules: `epochs` (fixed), `loss_below` (loss under a threshold for `patience` optimizer
steps, counted consecutively or cumulatively), `until_memorized` (exact match 100% on the stage's
set, checked every epoch). The last two stop at `epochs` at the latest.

`loss_below` counts consecutive steps by default: the rule then means what it says, the loss
has settled under the threshold, and one lucky batch of easy items cannot end a stage. The
paper's reference code counts low-loss steps cumulatively and never resets the count
(`count: cumulative`, used by configs/paper/*.yaml to follow it)."""

from __future__ import annotations

from dataclasses import dataclass

from factmem.config import StopConfig


@dataclass
class StopState:
    steps_below: int = 0  # optimizer steps with loss < threshold (consecutive or cumulative)
    stopped: bool = False
    reason: str = ""


class StopRule:
    def __init__(self, cfg: StopConfig):
        self.cfg = cfg
        self.state = StopState()

    @property
    def max_epochs(self) -> int:
        return self.cfg.epochs

    @property
    def checks_memorization(self) -> bool:
        return self.cfg.rule == "until_memorized"

    def after_step(self, loss: float) -> bool:
        if self.cfg.rule == "loss_below":
            if loss < self.cfg.threshold:
                self.state.steps_below += 1
            elif self.cfg.count == "consecutive":
                self.state.steps_below = 0
            if self.state.steps_below >= self.cfg.patience:
                return self._stop(f"loss < {self.cfg.threshold:g} for {self.cfg.patience} "
                                  f"{self.cfg.count} steps")
        return False

    def after_epoch(self, epoch: int, memorized_accuracy: float | None = None) -> bool:
        """`epoch` is 1-based and counts finished epochs."""
        if (self.checks_memorization and memorized_accuracy is not None
                and memorized_accuracy >= 1.0):
            return self._stop(f"memorized (exact match 100%) after epoch {epoch}")
        if epoch >= self.cfg.epochs:
            return self._stop(f"reached {self.cfg.epochs} epochs" if self.cfg.rule == "epochs"
                              else f"reached the maximum of {self.cfg.epochs} epochs")
        return False

    def _stop(self, reason: str) -> bool:
        self.state.stopped, self.state.reason = True, reason
        return True
