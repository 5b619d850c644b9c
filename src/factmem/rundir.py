"""The run directory: the one module that knows its layout.

Every file and folder name of a run lives here, with the paths into it, the lock that keeps one
writer per directory, the check that a continued run has the same config, the model weights
kept after a finished stage, the accuracy record and the timings. Other modules ask for a path;
none spells a name.

    RUN_DIR = output.dir/NAME (NAME made safe for a file system, see `safe_name`)
        config.yaml                 the config as given (with --set overrides applied)
        resolved.json               every variant fully resolved
        data.json                   items dropped from sets by max_tokens / filtering
        summary.json, summary.md    variant x tracked set: accuracy after each stage, over seeds
        timing.json                 wall seconds per variant/seed (kept across resumes)
        comparison.json, .md        variants against their baseline (factmem.compare)
        analysis/TABLE.jsonl        factmem analyze (and analysis/summary.json)
        report.md, report.html      factmem report (figures in report/)
        VARIANT/seedS/
            accuracy.json           accuracy matrix A[stage][set], graded figures, forgetting
            00-base/                tracked sets evaluated before any training
            01-STAGE/               manifest.json (mixture ids), train_log.jsonl, metrics.json,
                                    predictions/SET.jsonl, checkpoint/ (output.save_checkpoints),
                                    retention.jsonl (eval.retention_every), fisher.safetensors
                                    (EWC), reused_from.json (copied from an identical stage),
                                    resume/ (weights to continue from; deleted once finished)
    output.dir/.NAME.lock           the lock, beside the directory (see RunLock)

Crash safety: a run killed at any moment (SIGKILL included) continues when the same command is
run again. A variant/seed is finished when its accuracy.json exists (skipped, its record is read
back); a stage is finished when its metrics.json exists (written last). The model after the last
finished stage is kept in `resume/final/` until the variant/seed is finished; an unfinished stage
continues from its in-stage checkpoint `resume/step-NNNNNN/` (factmem.train.checkpoint). Tensors
are written with safetensors and everything else as JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from factmem import distributed as dist
from factmem import files
from factmem.errors import FactmemError
from factmem.evaluate import forgetting

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Names

# the run
CONFIG_FILE = "config.yaml"
RESOLVED_FILE = "resolved.json"
DATA_REPORT_FILE = "data.json"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
TIMING_FILE = "timing.json"
COMPARISON_FILE = "comparison.json"
COMPARISON_MD = "comparison.md"
ANALYSIS_DIR = "analysis"  # factmem analyze: TABLE.jsonl and summary.json
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_FIGURES_DIR = "report"
# a variant/seed
ACCURACY_FILE = "accuracy.json"
BASE_STAGE = "base"  # the evaluation before any training, as the accuracy matrix names it
BASE_DIR = "00-base"
# a stage
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
TRAIN_LOG_FILE = "train_log.jsonl"
PREDICTIONS_DIR = "predictions"
CHECKPOINT_DIR = "checkpoint"  # a Hugging Face model directory (output.save_checkpoints)
RETENTION_FILE = "retention.jsonl"
FISHER_FILE = "fisher.safetensors"
REUSED_FROM_FILE = "reused_from.json"
RESUME_DIR = "resume"
FINAL_WEIGHTS_DIR = "final"  # in RESUME_DIR: the model after the stage
# saved weights and in-stage checkpoints (RESUME_DIR/step-NNNNNN/)
STATE_FILE = "state.json"  # written last: the directory is complete once it exists
MODEL_WEIGHTS = "model.safetensors"
TORCH_RNG = "rng.safetensors"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
SHARDED_MODEL_DIR = "model"  # FSDP: one safetensors file per rank
SHARDED_OPTIMIZER_DIR = "optimizer"
STEP_PREFIX = "step-"
RANK_FILE = "rank-{rank:05d}.json"  # FSDP: each rank's RNG state in a checkpoint
NONFINITE_FILE = "nonfinite.json"  # beside the checkpoints: where training went non-finite

# Settings that change how a run is carried out but not what it computes: may differ on resume.
OPERATIONAL_KEYS = ("output.checkpoint_every", "output.report_to")


# --------------------------------------------------------------------------------------------
# Paths


def safe_name(name: str) -> str:
    """A variant name as a single directory name (grid names hold `[`, `=`, `,`)."""
    out = "".join(c if c.isalnum() or c in "-_.=,[]" else "_" for c in name)
    if out in ("", ".", ".."):
        raise FactmemError(f"name {name!r} cannot be used as a directory name")
    return out


def run_root(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / safe_name(name)


def lock_path(root: Path) -> Path:
    """Beside the run directory, so that --restart can delete the directory while holding it."""
    return root.parent / f".{root.name}.lock"


@dataclass
class RunPaths:
    root: Path

    def seed_dir(self, variant: str, seed: int) -> Path:
        return self.root / safe_name(variant) / f"seed{seed}"


def analysis_table(root: Path, table: str) -> Path:
    return root / ANALYSIS_DIR / f"{table}.jsonl"


def analysis_summary(root: Path) -> Path:
    return root / ANALYSIS_DIR / SUMMARY_FILE


def base_dir(seed_dir: Path) -> Path:
    return seed_dir / BASE_DIR


def stage_dir(seed_dir: Path, k: int, name: str) -> Path:
    """The directory of stage k (0-based) named `name`: `01-NAME` for the first."""
    return seed_dir / f"{k + 1:02d}-{safe_name(name)}"


def stage_path(seed_dir: Path, cfg, k: int) -> Path:
    """The directory of stage k of the variant `cfg`."""
    return stage_dir(seed_dir, k, cfg.stages[k].name)


def stage_number(path: Path) -> int | None:
    """1 for `01-NAME`, 0 for the base directory, None for anything else."""
    head = path.name[:2]
    return int(head) if head.isdigit() else None


def stage_dirs(cfg, seed_dir: Path) -> list[tuple[str, str | None, Path]]:
    """[(stage name, set it trains, directory)] starting with the base evaluation."""
    out: list[tuple[str, str | None, Path]] = [(BASE_STAGE, None, base_dir(seed_dir))]
    for k, st in enumerate(cfg.stages):
        out.append((st.name, st.set, stage_dir(seed_dir, k, st.name)))
    return out


def finished_stage_dirs(cfg, seed_dir: Path) -> list[tuple[str, str | None, Path]]:
    """`stage_dirs` up to the first stage not finished (the ones after it have not run)."""
    out = []
    for entry in stage_dirs(cfg, seed_dir):
        if not is_finished(entry[2]):
            break
        out.append(entry)
    return out


def metrics_file(stage_dir: Path) -> Path:
    return stage_dir / METRICS_FILE


def is_finished(stage_dir: Path) -> bool:
    """A stage (or the base evaluation) is finished once its metrics.json is written."""
    return metrics_file(stage_dir).is_file()


def read_metrics(stage_dir: Path) -> dict[str, Any]:
    return files.read_json(metrics_file(stage_dir))


def read_eval(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Set -> the tracked set's figures after the stage (accuracy, token_acc, logprob, ...)."""
    return read_metrics(stage_dir)["eval"]


def predictions_file(stage_dir: Path, set_name: str) -> Path:
    return stage_dir / PREDICTIONS_DIR / f"{set_name}.jsonl"


def checkpoint_dir(stage_dir: Path) -> Path:
    return stage_dir / CHECKPOINT_DIR


def resume_dir(stage_dir: Path) -> Path:
    return stage_dir / RESUME_DIR


def final_weights_dir(stage_dir: Path) -> Path:
    return resume_dir(stage_dir) / FINAL_WEIGHTS_DIR


def drop_resume_dir(stage_dir: Path) -> None:
    """The stage's weights and checkpoints to continue from are no longer needed."""
    shutil.rmtree(resume_dir(stage_dir), ignore_errors=True)


def accuracy_file(seed_dir: Path) -> Path:
    return seed_dir / ACCURACY_FILE


def is_seed_finished(seed_dir: Path) -> bool:
    """A variant/seed is finished once its accuracy.json is written (its stages all are)."""
    return accuracy_file(seed_dir).is_file()


def open_run(run_dir: str | Path) -> tuple[Path, Any]:
    """(root, Experiment) of a run directory, for the readers of a run (factmem.load_run,
    analyze, report)."""
    from factmem.config import load_experiment

    root = Path(run_dir)
    if not (root / CONFIG_FILE).is_file():
        raise FactmemError(f"{root}: not a run directory (no config.yaml); "
                           "give the directory `factmem run` printed")
    return root, load_experiment(root / CONFIG_FILE)


# --------------------------------------------------------------------------------------------
# The accuracy record (accuracy.json)


def accuracy_record(cfg, matrix: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The record of a variant/seed from its matrix (stage -> set -> summarized figures, base
    first): accuracy, token accuracy and gold log-prob per stage and set, and forgetting. A
    partial matrix (a run still going) gives the record of the stages it has."""
    own_stage = {}
    for st in cfg.stages:
        for s in (st.set, *st.joint):
            if s in cfg.track:
                own_stage[s] = st.name  # the last stage that trained the set
    acc = _figure(matrix, "accuracy")
    return {"stages": list(matrix), "sets": list(cfg.track), "accuracy": acc,
            "token_acc": _figure(matrix, "token_acc"), "logprob": _figure(matrix, "logprob"),
            "forgetting": forgetting(acc, own_stage)}


def _figure(matrix: dict[str, dict[str, dict[str, float]]], metric: str
            ) -> dict[str, dict[str, float]]:
    """stage -> set -> one figure of the matrix."""
    return {st: {s: m[metric] for s, m in row.items()} for st, row in matrix.items()}


def finished_record(cfg, seed_dir: Path) -> dict[str, Any] | None:
    """The accuracy record of the stages finished so far in `seed_dir`, read from their own
    metrics.json (a run still going, or stopped, has no accuracy.json yet); None if none is."""
    matrix = {stage: read_eval(d) for stage, _, d in finished_stage_dirs(cfg, seed_dir)}
    return accuracy_record(cfg, matrix) if matrix else None


# --------------------------------------------------------------------------------------------
# Wall seconds per variant/seed (timing.json)


class RunTimings:
    """timing.json: wall seconds per variant/seed, written after each one so that a killed run
    keeps what it measured. A variant/seed finished by an earlier run keeps that run's figure;
    where none was written (a run dir from before this file was kept up to date), the seconds
    of the stages it trained itself are summed (training and in-stage evaluation; copied stages
    and the base evaluation add nothing)."""

    def __init__(self, root: Path, enabled: bool = True):
        self.path = root / TIMING_FILE
        self.enabled = enabled
        self.seconds: dict[str, float] = {}  # in the order the runs come, earlier ones too
        self.earlier: dict[str, float] = {}
        if enabled and self.path.is_file():
            self.earlier = {k: v for k, v in files.read_json(self.path).items()
                            if isinstance(v, (int, float)) and v > 0}

    def record(self, key: str, seconds: float) -> None:
        self.seconds[key] = round(seconds, 2)
        self._write()

    def keep_earlier(self, key: str, cfg, seed_dir: Path) -> None:
        trained = [d for _, _, d in finished_stage_dirs(cfg, seed_dir)
                   if not (d / REUSED_FROM_FILE).is_file()]
        self.seconds[key] = self.earlier.get(key) or round(
            sum(read_metrics(d).get("seconds", 0.0) for d in trained), 2)
        self._write()

    def _write(self) -> None:
        if self.enabled:
            files.write_json(self.path, self.seconds)


# --------------------------------------------------------------------------------------------
# One writer per run directory


class RunLock:
    """`<parent>/.<run>.lock` created with O_CREAT|O_EXCL, holding `pid@host`. A lock whose
    process is gone (same host, pid not alive) is stale and taken over. It sits beside the run
    directory so that --overwrite can delete the directory while holding it.

    Hand-written rather than the `filelock` package: its default lock (flock) does not hold on
    NFS and names no owner, and only its 4.x soft lock records an owner and takes over a dead
    one's lock, in a format of its own. factmem does not pin filelock (it comes in with
    huggingface_hub, often 3.x), and run directories written so far hold `pid@host` locks."""

    def __init__(self, root: Path):
        self.root = root
        self.path = lock_path(root)
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
                    f"run directory {self.root} is in use by process {owner or '?'} (lock "
                    f"{self.path}); wait for it to finish, or delete the lock file if that "
                    "process is gone") from None
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

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
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


def added_as_null(old: Any, new: Any, key: str) -> bool:
    """Whether dotted `key` is a setting factmem gained after `old` was written, left at null
    (a new field's "off"): not a change of the run's config."""
    for part in key.split("."):
        if not isinstance(new, dict) or part not in new:
            return False
        if not isinstance(old, dict) or part not in old:
            return new[part] is None
        old, new = old[part], new[part]
    return False


def check_resumable(root: Path, raw: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Refuse to continue in `root` unless it is a factmem run of the same config. Compares the
    config as given (keys the user wrote) and, failing that, every resolved variant."""
    saved = root / RESOLVED_FILE
    if not saved.is_file() and not (root / CONFIG_FILE).is_file():
        raise FactmemError(f"run directory {root} exists and is not a factmem run; pass "
                           "--overwrite to start over or --output DIR to write elsewhere")
    old_raw = _load_yaml(root / CONFIG_FILE)
    keys = [k for k in diff_keys(old_raw, raw) if not k.startswith(OPERATIONAL_KEYS)]
    if not keys and saved.is_file():  # (killed between writing the two files: raw only)
        old = files.read_json(saved)
        keys = [k for k in diff_keys(old, resolved)
                if not k.split(".", 1)[-1].startswith(OPERATIONAL_KEYS)
                and not added_as_null(old, resolved, k)]
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
# Saved weights: the model after a finished stage, and the sharded directory format that
# in-stage checkpoints (factmem.train.checkpoint) share


def save_stage_weights(model, stage_dir: Path, write: bool = True) -> None:
    """Model weights + RNG states after a stage, into `resume/final/` of `stage_dir`,
    atomically. A sharded model is saved by every rank (each writes its shard); otherwise only
    where `write` is true (the main process)."""
    path = final_weights_dir(stage_dir)
    if dist.is_sharded(model):
        write_sharded(path, {SHARDED_MODEL_DIR: dist.model_tensors(model)}, {})
        return
    if not write:
        return
    with files.atomic_dir(path, path.with_name(path.name + f".tmp{os.getpid()}")) as tmp:
        save_model(model, str(tmp / MODEL_WEIGHTS))
        save_file({"torch": torch.get_rng_state()}, str(tmp / TORCH_RNG))
        files.write_json(tmp / STATE_FILE, {"rng": host_rng_state()})


def load_stage_weights(model, stage_dir: Path) -> None:
    """Load weights saved by `save_stage_weights`, either format, into `model` (whole or
    sharded: a sharded save loads into a whole model too, on any process count)."""
    path = final_weights_dir(stage_dir)
    if dist.is_sharded_dir(path / SHARDED_MODEL_DIR):
        dist.load_sharded(dist.model_tensors(model), path / SHARDED_MODEL_DIR)
        dist.set_rng_state(rank_rng_state(path))
        return
    load_model(model, str(path / MODEL_WEIGHTS))
    torch.set_rng_state(load_file(str(path / TORCH_RNG))["torch"])
    set_host_rng_state(files.read_json(path / STATE_FILE)["rng"])


def has_stage_weights(stage_dir: Path) -> bool:
    path = final_weights_dir(stage_dir)
    return (path / STATE_FILE).is_file() and ((path / MODEL_WEIGHTS).is_file()
                                              or dist.is_sharded_dir(path / SHARDED_MODEL_DIR))


def write_sharded(path: Path, parts: dict[str, dict[str, torch.Tensor]],
                  state: dict[str, Any]) -> None:
    """A sharded directory, atomically: every rank writes its shard of each part
    (`path/PART/`) and its RNG states (`rank-0000R.json`) into a temporary directory; once all
    have, rank 0 writes `state.json` (`"format": "sharded"` and the process count) and renames
    the directory into place. A collective."""
    main = dist.rank() == 0
    with files.atomic_dir(path, path.with_name(f".{path.name}.tmp"), main=main,
                       barrier=dist.barrier) as tmp:
        for name, tensors in parts.items():
            dist.save_sharded(tensors, tmp / name)
        files.write_json(tmp / RANK_FILE.format(rank=dist.rank()), dist.rng_state())
        dist.barrier()
        if main:
            files.write_json(tmp / STATE_FILE, {"format": "sharded",
                                             "world_size": dist.world_size(), **state})


def rank_rng_state(path: Path) -> dict[str, Any]:
    """This rank's RNG states in a sharded directory; rank 0's when the directory was written
    by fewer processes."""
    mine = path / RANK_FILE.format(rank=dist.rank())
    return files.read_json(mine if mine.is_file() else path / RANK_FILE.format(rank=0))


# the Python/NumPy part of a stage's RNG state (torch's is a tensor, saved beside): one
# implementation, in distributed.py, which also writes each rank's full state
host_rng_state = dist.host_rng_state
set_host_rng_state = dist.set_host_rng_state
