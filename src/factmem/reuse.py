"""Stage reuse: variants that share their first stages (naive and replay share stage 1) train
them once.

A stage's key (`stage_keys`) hashes everything that determines the model and the results after
it; equal keys mean equal outcomes. `ReusePlan` gives each variant/seed its source: the first
variant/seed (in the config's order) that has the furthest of its stages. The source keeps its
weights after that stage (`STAGE/resume/final/`, kept anyway while it runs) on disk until every
variant/seed that copies them has done so; a copier copies the stage directories (each marked
`reused_from.json`) and those weights into its own directory, then continues from them as an
interrupted run continues from its own. Being on disk, they survive a restart and serve other
processes (`factmem run --jobs N`, factmem.jobs). Training is deterministic, so the outcome is
the same as retraining. Disk: the model's weights once per kept stage (538 MB for SmolLM2-135M
in float32). Single-process runs only (under `accelerate launch` every stage trains).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from factmem import files, rundir
from factmem.config import Experiment, ExperimentConfig, StageConfig, to_dict

log = logging.getLogger(__name__)

Unit = tuple[str, int]  # a variant/seed: (variant name, seed)


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


def unit_name(unit: Unit) -> str:
    return f"{unit[0]}/seed{unit[1]}"


@dataclass(frozen=True)
class Source:
    """Where a variant/seed's first stages come from: stages 1..k+1 (k 0-based) of `unit`."""

    unit: Unit
    k: int
    key: str  # the stage key of stage k


class ReusePlan:
    """Which variant/seed copies which stages from which, and the weights kept for them on disk
    (under `root`). Plain data: handed to worker processes as it is."""

    def __init__(self, exp: Experiment, root: Path | None = None, enabled: bool = True):
        self.cfgs: dict[str, ExperimentConfig] = dict(exp.variants)
        self.paths = rundir.RunPaths(root) if root is not None else None
        self.sources: dict[Unit, Source] = {}
        first: dict[str, Unit] = {}  # stage key -> the first variant/seed that has it
        for vname, cfg in exp.variants.items():
            for seed in cfg.seeds:
                keys = stage_keys(cfg, seed)
                source = self._find_source(cfg, keys, first)
                if source is not None:
                    self.sources[(vname, seed)] = source
                for key in keys:
                    first.setdefault(key, (vname, seed))
        self.shared = bool(self.sources)  # whether any stage is shared, reuse on or off
        if not enabled:
            self.sources = {}
        self.dependents: dict[tuple[Unit, int], list[Unit]] = {}
        for unit, src in self.sources.items():
            self.dependents.setdefault((src.unit, src.k), []).append(unit)

    def _find_source(self, cfg: ExperimentConfig, keys: list[str], first: dict[str, Unit]
                     ) -> Source | None:
        """The furthest stage an earlier variant/seed has, with plain weights after it, and
        every analysis checkpoint the copier keeps of the stages before it (a checkpoint can be
        written from the weights after the last copied stage, not from those before)."""
        for k in range(len(keys) - 1, -1, -1):
            if keys[k] not in first or not reusable(cfg.stages[k]):
                continue
            unit = first[keys[k]]
            theirs = self.cfgs[unit[0]].output
            if all(theirs.saves_checkpoint(st.name) or not cfg.output.saves_checkpoint(st.name)
                   for st in cfg.stages[:k]):
                return Source(unit, k, keys[k])
        return None

    # on disk ---------------------------------------------------------------------------------

    def seed_dir(self, unit: Unit) -> Path:
        if self.paths is None:
            raise RuntimeError("a ReusePlan without a run directory has no files")
        return self.paths.seed_dir(*unit)

    def stage_dir(self, unit: Unit, k: int) -> Path:
        return rundir.stage_path(self.seed_dir(unit), self.cfgs[unit[0]], k)

    def source_ready(self, unit: Unit) -> bool:
        """Whether `unit` can start: it copies nothing, or the stages it copies are finished."""
        src = self.sources.get(unit)
        return src is None or rundir.is_finished(self.stage_dir(src.unit, src.k))

    def needed(self, unit: Unit, k: int) -> bool:
        """Whether a variant/seed is still to copy the weights after stage k of `unit`."""
        return any(not rundir.is_finished(self.stage_dir(d, k))
                   for d in self.dependents.get((unit, k), []))

    def copy_source(self, unit: Unit) -> int:
        """Copy the stages `unit` shares with its source into its directory, unless it has them
        already. Returns the index of the last stage copied, or -1 if none was."""
        src = self.sources.get(unit)
        if src is None or rundir.is_finished(self.stage_dir(unit, src.k)):
            return -1
        theirs = self.stage_dir(src.unit, src.k)
        if not (rundir.is_finished(theirs) and rundir.has_stage_weights(theirs)):
            log.info("%s: the stages it shares with %s are not on disk (a run directory from "
                     "before they were kept?); training them", unit_name(unit),
                     unit_name(src.unit))
            return -1
        copy_stage_dirs(self.seed_dir(src.unit), self.seed_dir(unit), src.k, src.key,
                        self.cfgs[unit[0]])
        log.info("%s: stages 1-%d copied from %s (same settings and seed)", unit_name(unit),
                 src.k + 1, unit_name(src.unit))
        return src.k

    def release(self, unit: Unit, k: int) -> None:
        """The weights after stage k of `unit` go, unless a variant/seed is still to copy them.
        Only the process that runs `unit`, or the parent between runs, calls this."""
        if not self.needed(unit, k):
            rundir.drop_resume_dir(self.stage_dir(unit, k))

    def sweep(self, busy: Collection[Unit] = ()) -> None:
        """Kept weights of finished variant/seeds that nothing is still to copy go (those left
        by an interrupted run too). `busy` variant/seeds are running elsewhere: not touched."""
        for vname, cfg in self.cfgs.items():
            for seed in cfg.seeds:
                unit = (vname, seed)
                if unit in busy or not rundir.is_seed_finished(self.seed_dir(unit)):
                    continue
                for k in range(len(cfg.stages)):
                    if rundir.resume_dir(self.stage_dir(unit, k)).exists():
                        self.release(unit, k)


def copy_stage_dirs(src: Path, out: Path, k: int, key: str, cfg: ExperimentConfig) -> None:
    """The base evaluation and stages 1..k+1 of the variant/seed in `src` into `out` (whose
    variant is `cfg`), each directory atomically and marked with where it came from, with the
    weights after stage k+1 to continue from, and a stage's analysis checkpoint only where `cfg`
    keeps it. In stage order: a copy cut short is copied again (its last stage is unfinished)."""
    for d in sorted(src.iterdir()):
        number = rundir.stage_number(d)
        if not d.is_dir() or number is None or number > k + 1:
            continue
        keep_checkpoint = number > 0 and cfg.output.saves_checkpoint(cfg.stages[number - 1].name)
        skip = (rundir.RESUME_DIR,) if keep_checkpoint else (rundir.RESUME_DIR,
                                                               rundir.CHECKPOINT_DIR)
        with files.atomic_dir(out / d.name) as tmp:
            files.copy_tree(d, tmp, skip=skip)
            if number == k + 1:
                files.copy_tree(rundir.final_weights_dir(d), rundir.final_weights_dir(tmp))
            files.write_json(tmp / rundir.REUSED_FROM_FILE, {"path": str(d), "key": key})
