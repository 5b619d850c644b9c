"""Training: length-grouped batches, stop rules and the stage loop (on accelerate)."""

from factmem.train.loop import StageCallback, StageContext, StageResult, train_stage

__all__ = ["StageCallback", "StageContext", "StageResult", "train_stage"]
