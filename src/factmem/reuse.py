"""Stage reuse: variants that share their first stages (naive and replay share stage 1) train
them once.

A stage's key (`stage_keys`) hashes everything that determines the model and the results after
it; equal keys mean equal outcomes. After a stage whose key a later variant also has, the model
weights and torch RNG state are kept in CPU memory; the later variant starts from them and
copies the stage directories, marked with `reused_from.json`. Training is deterministic, so the
outcome is the same as retraining. Single-process runs only (sharded weights are not gathered
for this).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from factmem import files
from factmem.config import Experiment, ExperimentConfig, StageConfig, to_dict
from factmem.rundir import RESUME_DIR, REUSED_FROM_FILE, stage_number

log = logging.getLogger(__name__)


def stage_keys(cfg: ExperimentConfig, seed: int) -> list[str]:
    """Per stage k: a hash of everything that determines the model and results after it (model,
    data, tracked sets, evaluation, stages 1..k, seed). Equal keys mean equal outcomes."""
    common = {"model": to_dict(cfg.model), "sets": to_dict(cfg.sets), "track": cfg.track,
              "eval": to_dict(cfg.eval), "seed": seed}
    return [
        hashlib.sha256(json.dumps({**common, "stages": to_dict(cfg.stages[: k + 1])},
                                  sort_keys=True).encode()).hexdigest()[:16]
        for k in range(len(cfg.stages))
    ]


def reusable(stage: StageConfig) -> bool:
    """Whether the model after the stage can be kept: plain weights (no unmerged adapter)."""
    return stage.lora is None or stage.lora.merge


class StageReuse:
    """The stages kept in memory for later variants, and how many runs still need each."""

    def __init__(self, exp: Experiment, enabled: bool = True):
        self.enabled = enabled
        self.uses: dict[str, int] = {}
        for cfg in exp.variants.values():
            for seed in cfg.seeds:
                for key in stage_keys(cfg, seed):
                    self.uses[key] = self.uses.get(key, 0) + 1
        self.kept: dict[str, dict[str, Any]] = {}

    def offer(self, key: str, model, matrix: dict, out: Path, k: int) -> None:
        """Keep the model after stage k (run in `out`) if a later run has the same stage."""
        if self.enabled and self.uses.get(key, 0) > 1 and key not in self.kept:
            self.kept[key] = {
                "state": {n: t.detach().to("cpu", copy=True)
                          for n, t in model.state_dict().items()},
                "rng": torch.get_rng_state(), "matrix": json.loads(json.dumps(matrix)),
                "dir": out, "k": k,
            }

    def restore(self, keys: list[str], model, matrix: dict, out: Path) -> int:
        """Load the furthest kept stage of `keys` into `model`; returns its index or -1."""
        for k in range(len(keys) - 1, -1, -1):
            entry = self.kept.get(keys[k])
            if entry is None:
                continue
            model.load_state_dict(entry["state"])
            torch.set_rng_state(entry["rng"])
            matrix.update(json.loads(json.dumps(entry["matrix"])))
            copy_stage_dirs(entry["dir"], out, k, keys[k])
            log.info("reusing stages 1-%d from %s (same settings and seed)", k + 1, entry["dir"])
            return k
        return -1

    def finished(self, keys: list[str]) -> None:
        """A run with these stage keys is done (or skipped): drop what no later run needs."""
        for key in keys:
            self.uses[key] = self.uses.get(key, 1) - 1
            if self.uses[key] <= 0:  # no later run needs it
                self.kept.pop(key, None)


def copy_stage_dirs(src: Path, out: Path, k: int, key: str) -> None:
    """The base evaluation and stages 1..k+1 of the run in `src` into `out`, without their
    weights to resume from, each marked with where it came from."""
    for d in sorted(src.iterdir()):
        number = stage_number(d)
        if d.is_dir() and number is not None and number <= k + 1:
            shutil.copytree(d, out / d.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(RESUME_DIR))
            files.write_json(out / d.name / REUSED_FROM_FILE,
                             {"path": str(src / d.name), "key": key})
