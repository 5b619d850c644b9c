"""The run directory: the one module that knows its layout.

Every file and folder name of a run lives here, with the paths into it, the lock that keeps one
writer per directory, the check that a continued run has the same config, the model weights
kept after a finished stage, the accuracy record and the timings. Other modules ask for a path;
none spells a name.

    RUN_DIR = output.dir/NAME (NAME: one plain file name, factmem.config.checks)
        .factmem-run                written first: factmem made this directory (--restart
                                    deletes nothing else; runs from before it: config.yaml +
                                    resolved.json)
        config.yaml                 the config as given (with --set overrides applied)
        resolved.json               every variant fully resolved
        data.json                   items dropped from sets by max_tokens / filtering
        summary.json, summary.md    variant x tracked set: accuracy after each stage, over seeds
        timing.json                 wall seconds per variant/seed (summed across resumes)
        comparison.json, .md        variants against their baseline (factmem.compare)
        analysis/TABLE.jsonl        factmem analyze (and analysis/summary.json)
        report.md, report.html      factmem report (figures in report/)
        logs/VARIANT/seedS.log      factmem run --jobs N: each worker process's log
        VARIANT/seedS/
            accuracy.json           accuracy matrix A[stage][set], graded figures, forgetting
            00-base/                tracked sets evaluated before any training
            01-STAGE/               manifest.json (mixture ids), train_log.jsonl, metrics.json,
                                    predictions/SET.jsonl, checkpoint/ (output.save_checkpoints),
                                    retention.jsonl (eval.retention_every), fisher.safetensors
                                    (EWC), reused_from.json (copied from an identical stage),
                                    resume/ (weights to continue from; deleted once finished
                                    and no other variant/seed is still to copy them)
    output.dir/.NAME.lock           the lock, beside the directory (see RunLock)

Crash safety: a run killed at any moment (SIGKILL included) continues when the same command is
run again. A variant/seed is finished when its accuracy.json exists (skipped, its record is read
back); a stage is finished when its metrics.json exists (written last). The model after the last
finished stage is kept in `resume/final/` until the variant/seed is finished (and, for a stage
that later variant/seeds copy, until they have: factmem.reuse); an unfinished stage
continues from its in-stage checkpoint `resume/step-NNNNNN/` (factmem.train.checkpoint). Tensors
are written with safetensors and everything else as JSON: nothing is ever unpickled. A file
damaged anyway (a full disk, a copy cut short, a hand edit) is one line naming it and saying
what to delete and what is then done again (`repair_advice`), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from factmem import distributed as dist
from factmem import files
from factmem.errors import FactmemError
from factmem.evaluate import forgetting
from factmem.files import safe_name

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Names

# the run
MARKER_FILE = ".factmem-run"  # written first: factmem made the directory (see `owns`)
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
LOGS_DIR = "logs"  # factmem run --jobs N: one log per variant/seed's worker
# a variant/seed
ACCURACY_FILE = "accuracy.json"
BASE_STAGE = "base"  # the evaluation before any training, as the accuracy matrix names it
BASE_DIR = "00-base"
# a stage
METRICS_FILE = "metrics.json"
# metrics.json keys holding wall time (the rest is reproducible; compare runs without these)
METRICS_WALL_TIME = ("seconds", "resumed_after_seconds")
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


def run_root(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / safe_name(name)


def lock_path(root: Path, purpose: str = "run") -> Path:
    """Beside the run directory, so that --restart can delete the directory while holding it.
    `factmem analyze` takes a lock of its own (purpose "analyze"): it may read a run that is
    still training, but two analyses of one run would overwrite each other's tables."""
    suffix = "" if purpose == "run" else f".{purpose}"
    return root.parent / f".{root.name}{suffix}.lock"


@dataclass
class RunPaths:
    root: Path

    def seed_dir(self, variant: str, seed: int) -> Path:
        return self.root / safe_name(variant) / f"seed{seed}"


def worker_log(root: Path, variant: str, seed: int) -> Path:
    """The log of the worker process that runs a variant/seed (factmem.jobs)."""
    return root / LOGS_DIR / safe_name(variant) / f"seed{seed}.log"


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


def trained_stage_dirs(cfg, seed_dir: Path) -> list[Path]:
    """The finished stages a variant/seed trained itself (not copied from another)."""
    return [d for _, _, d in finished_stage_dirs(cfg, seed_dir)
            if not (d / REUSED_FROM_FILE).is_file()]


def metrics_file(stage_dir: Path) -> Path:
    return stage_dir / METRICS_FILE


def is_finished(stage_dir: Path) -> bool:
    """A stage (or the base evaluation) is finished once its metrics.json is written."""
    return metrics_file(stage_dir).is_file()


def read_metrics(stage_dir: Path) -> dict[str, Any]:
    path = metrics_file(stage_dir)
    metrics = read_json(path)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("eval"), dict):
        raise damaged(path, "no 'eval' record")
    return metrics


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


def read_accuracy(seed_dir: Path) -> dict[str, Any]:
    """The accuracy record of a finished variant/seed."""
    path = accuracy_file(seed_dir)
    record = read_json(path)
    if not isinstance(record, dict) or "accuracy" not in record:
        raise damaged(path, "no 'accuracy' record")
    return record


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
    and the base evaluation add nothing). A variant/seed an earlier run stopped part-way gets
    this run's wall seconds plus the stages' seconds before the stop (`begin` notes which stages
    those are): the earlier run's model loading and evaluations are not known, so not counted."""

    def __init__(self, root: Path, enabled: bool = True):
        self.path = root / TIMING_FILE
        self.enabled = enabled
        self.seconds: dict[str, float] = {}  # in the order the runs come, earlier ones too
        self.earlier: dict[str, float] = {}
        self.begun: dict[str, tuple[Any, Path, set[str]]] = {}
        if enabled and self.path.is_file():
            earlier = read_json(self.path)
            if not isinstance(earlier, dict):
                raise damaged(self.path, "not a mapping")
            self.earlier = {k: v for k, v in earlier.items()
                            if isinstance(v, (int, float)) and v > 0}

    def begin(self, key: str, cfg, seed_dir: Path) -> None:
        """Before a variant/seed runs: the stages an earlier run trained for it (`record` adds
        their seconds)."""
        self.begun[key] = (cfg, seed_dir, {d.name for d in trained_stage_dirs(cfg, seed_dir)})

    def record(self, key: str, seconds: float) -> None:
        if key in self.begun:
            cfg, seed_dir, earlier = self.begun.pop(key)
            for d in trained_stage_dirs(cfg, seed_dir):
                m = read_metrics(d)
                seconds += m.get("seconds", 0.0) if d.name in earlier else m.get(
                    "resumed_after_seconds", 0.0)  # a stage stopped part-way, continued now
        self.seconds[key] = round(seconds, 2)
        self._write()

    def keep_earlier(self, key: str, cfg, seed_dir: Path) -> None:
        self.seconds[key] = self.earlier.get(key) or round(
            sum(read_metrics(d).get("seconds", 0.0) for d in trained_stage_dirs(cfg, seed_dir)), 2)
        self._write()

    def _write(self) -> None:
        if self.enabled:
            files.write_json(self.path, self.seconds)


# --------------------------------------------------------------------------------------------
# One writer per run directory


HEARTBEAT_S = 30.0  # the holder of a lock touches it this often (its mtime is the heartbeat)
STALE_AFTER_S = 600.0  # a lock from another host with no heartbeat for this long is taken over


class RunLock:
    """`<parent>/.<run>.lock` created with O_CREAT|O_EXCL, holding `pid@host` and
    `heartbeat SECONDS`; while it is held a thread touches it every SECONDS. It sits beside the
    run directory so that --restart can delete the directory while holding it.

    A lock is taken over (with a warning) when its process is gone: on this host, its pid is
    not running; from another host, whose processes cannot be asked, it has had no heartbeat for
    STALE_AFTER_S (10 minutes, 20 missed beats: the hosts' clocks must agree to within a few
    minutes); an empty lock (its writer killed between creating and writing it) once it is as
    old. `break_lock` (`--break-lock`) takes over any lock: for a lock from another host written
    by a factmem without heartbeats, or to go on at once; a process still running there would
    write beside this one. A takeover removes the lock only if it is still the file that was
    judged stale (same inode and mtime), so two processes cannot both take it.

    Hand-written rather than the `filelock` package: its default lock (flock) does not hold on
    NFS and names no owner, and only its 4.x soft lock records an owner and takes over a dead
    one's lock, in a format of its own. factmem does not pin filelock (it comes in with
    huggingface_hub, often 3.x), and run directories written so far hold `pid@host` locks."""

    def __init__(self, root: Path, break_lock: bool = False, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, purpose: str = "run"):
        self.root = root
        self.purpose = purpose
        self.path = lock_path(root, purpose)
        self.break_lock = break_lock
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.held = False
        self.me = f"{os.getpid()}@{socket.gethostname()}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FactmemError(f"cannot create {self.path.parent} ({e.strerror})") from None
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.me}\nheartbeat {self.heartbeat_s:g}\n")
            self.held = True
            self._start_heartbeat()
            return
        raise FactmemError(f"cannot take the lock {self.path}: another process took it first")

    def _take_over_or_refuse(self) -> None:
        try:
            st = self.path.stat()
            lines = self.path.read_text(errors="replace").splitlines()
        except OSError:  # removed meanwhile: try again
            return
        owner = lines[0].strip() if lines and lines[0].strip() else None
        beats = len(lines) > 1 and lines[1].startswith("heartbeat")
        age = time.time() - st.st_mtime
        reason = self._stale(owner, beats, age)
        if reason is None:
            raise FactmemError(self._in_use(owner, beats, age))
        log.warning("removing stale lock %s of %s: %s", self.path, owner or "?", reason)
        now = self.path.stat() if self.path.exists() else None
        if now is not None and (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
            self.path.unlink(missing_ok=True)

    def _stale(self, owner: str | None, beats: bool, age: float) -> str | None:
        """Why the lock is stale, or None if its process may be running."""
        if self.break_lock:
            return "--break-lock given"
        if owner is None:
            return f"empty for {age / 60:.0f} minutes" if age > self.stale_after_s else None
        if _on_this_host(owner):
            return None if _alive(owner) else f"process {owner} is gone"
        if beats and age > self.stale_after_s:
            return f"no heartbeat for {age / 60:.0f} minutes"
        return None

    def _in_use(self, owner: str | None, beats: bool, age: float) -> str:
        what = "run directory" if self.purpose == "run" else f"{self.purpose} of"
        head = f"{what} {self.root} is in use by process {owner or '?'} (lock {self.path}"
        if owner is None:
            return f"{head}, being written); wait a moment and run again"
        if _on_this_host(owner):
            return f"{head}); wait for it to finish"
        if beats:
            return (f"{head}, heartbeat {age:.0f} s ago); it is taken over once it is "
                    f"{self.stale_after_s / 60:.0f} minutes old, or pass --break-lock if that "
                    "process is gone")
        return (f"{head}, written without heartbeats); pass --break-lock if that process is "
                "gone")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="factmem-lock-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._mine():
                log.error("the lock %s is no longer this process's (taken over?); another "
                          "process may be writing in %s", self.path, self.root)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def beating(self) -> bool:
        return self._beat is not None and self._beat.is_alive()

    def _mine(self) -> bool:
        try:
            return self.path.read_text().split("\n", 1)[0] == self.me
        except OSError:
            return False

    def release(self) -> None:
        if self.held:
            self._stop.set()
            if self._beat is not None:
                self._beat.join(timeout=5)
            if self._mine():  # never a lock another process took over meanwhile
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _on_this_host(owner: str) -> bool:
    host = owner.partition("@")[2]
    return not host or host == socket.gethostname()


def _alive(owner: str) -> bool:
    """Whether `pid@host` (of this host) names a running process."""
    try:
        os.kill(int(owner.partition("@")[0]), 0)
    except (ValueError, ProcessLookupError, OverflowError):
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
        if owns(root):  # killed between writing the marker and the config: nothing to compare
            return
        raise FactmemError(f"run directory {root} exists and is not a factmem run (no "
                           f"{MARKER_FILE}, no {CONFIG_FILE}); give --output DIR or another "
                           "name: to write elsewhere")
    old_raw = _load_yaml(root / CONFIG_FILE)
    keys = [k for k in diff_keys(old_raw, raw) if not k.startswith(OPERATIONAL_KEYS)]
    if not keys and saved.is_file():  # (killed between writing the two files: raw only)
        from factmem.config.schema import is_new_default

        old = read_json(saved)
        keys = [k for k in diff_keys(old, resolved)
                if not k.split(".", 1)[-1].startswith(OPERATIONAL_KEYS)
                and not added_as_null(old, resolved, k)
                and not _added_since(old, resolved, k, is_new_default)]
    if keys:
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise FactmemError(f"run directory {root} holds a different config (changed: {shown}); "
                           "pass --restart to start over or --output DIR to write elsewhere")


def _added_since(old: dict[str, Any], new: dict[str, Any], key: str, is_new_default) -> bool:
    """`key` (VARIANT.dotted.path) is missing from a run written before its field existed,
    and holds that field's default now: the old run ran with it."""
    def lookup(tree: Any, parts: list[str]) -> tuple[bool, Any]:
        for p in parts:
            if isinstance(tree, dict) and p in tree:
                tree = tree[p]
            elif isinstance(tree, list) and p.isdigit() and int(p) < len(tree):
                tree = tree[int(p)]
            else:
                return False, None
        return True, tree

    parts = key.split(".")
    in_old, _ = lookup(old, parts)
    in_new, value = lookup(new, parts)
    return not in_old and in_new and is_new_default(".".join(parts[1:]), value)


def _load_yaml(path: Path) -> Any:
    """The config.yaml of a run (None if it was never written); damaged: one line."""
    import yaml

    from factmem.config.yaml_io import load_yaml_text

    if not path.is_file():
        return None
    try:
        return load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8") from None
    except yaml.YAMLError as e:
        raise damaged(path, f"malformed YAML: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------
# Where a run may write, and what --restart may delete


def checked_root(output_dir: str | None, config_dir: str, name: str) -> Path:
    """The run directory under `output_dir` (--output) or else `config_dir` (output.dir), once
    that directory is known to be usable: no NUL, no file on the way, writable."""
    key, where = ("--output", output_dir) if output_dir else ("output.dir", config_dir)
    if "\0" in where:
        raise FactmemError(f"{key}: contains a NUL character ({where!r}); give a directory path")
    path = Path(where)
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        what = "a broken symbolic link" if existing.is_symlink() else "a file"
        raise FactmemError(f"{key}: {existing} is {what}, not a directory; give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FactmemError(f"{key}: cannot write into {existing} (permission denied); give a "
                           "directory you can write into")
    return run_root(where, name)


def owns(root: Path) -> bool:
    """Whether factmem wrote `root`: it holds the marker or, a run from before the marker, both
    config.yaml and resolved.json. Only files count, never symbolic links to them."""
    def plain_file(p: Path) -> bool:
        return p.is_file() and not p.is_symlink()

    return plain_file(root / MARKER_FILE) or (plain_file(root / CONFIG_FILE)
                                              and plain_file(root / RESOLVED_FILE))


def check_run_dir(root: Path, overwrite: bool, raw: dict[str, Any], resolved: dict[str, Any]
                  ) -> Literal["new", "restart", "continue"]:
    """What a run does with its directory: write a new one, delete factmem's and start over
    (--restart), or continue it (the same config only). Refuses a file in its place, a delete
    through a symbolic link and a delete of anything factmem did not write. The dry run and the
    run both ask this, the run again once it holds the lock."""
    if root.is_symlink() and overwrite:
        raise FactmemError(f"{root} is a symbolic link; factmem never deletes through one "
                           "(--restart): delete its target yourself or give --output DIR")
    if os.path.lexists(root) and not root.is_dir():
        raise FactmemError(f"{root} is a file, not a directory; give --output DIR or another "
                           "name: to write elsewhere")
    if not root.exists() or not any(root.iterdir()):
        return "new"
    if overwrite:
        if not owns(root):
            raise FactmemError(
                f"{root} exists and is not a factmem run (no {MARKER_FILE}, no {CONFIG_FILE} + "
                f"{RESOLVED_FILE}); factmem deletes only directories it wrote (--restart): move "
                "it away or give --output DIR")
        return "restart"
    check_resumable(root, raw, resolved)
    return "continue"


def remove_run_dir(root: Path) -> None:
    """Delete a run directory for --restart, checked as `check_run_dir` checks it. shutil.rmtree
    removes symbolic links inside it and never follows them."""
    if root.is_symlink() or not owns(root):
        raise FactmemError(f"{root}: not deleted: not a factmem run directory")
    log.info("deleting the run directory %s (--restart)", root)
    shutil.rmtree(root)


def mark(root: Path) -> None:
    """The marker that makes `root` factmem's (written before anything else in it)."""
    from factmem import __version__

    if not (root / MARKER_FILE).is_file():
        files.write_json(root / MARKER_FILE, {"written_by": "factmem", "version": __version__})


# --------------------------------------------------------------------------------------------
# Reading back, and damaged files


def read_json(path: Path) -> Any:
    """A JSON file of a run; a damaged one is one line naming it and what to do."""
    with reading(path):
        return files.read_json(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with reading(path):
        return files.read_jsonl(path)


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Around a read of `path` (JSON, safetensors): a damaged file becomes one line naming it
    and saying what to do (`repair_advice`)."""
    try:
        yield
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON: {e.msg}, line {e.lineno}") from None
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8") from None
    except SafetensorError as e:
        raise damaged(path, str(e).splitlines()[0][:160]) from None


def damaged(path: Path, reason: str) -> FactmemError:
    return FactmemError(f"{path}: corrupted or truncated ({reason}); {repair_advice(path)}")


SEED_DIR_PATTERN = re.compile(r"seed\d+")


def repair_advice(path: Path) -> str:
    """What to do about a damaged file of a run directory: what to delete, and what is then
    done again when the same command runs again."""
    again = "and run `factmem run` again with the same config"
    restart = "or pass --restart to start the run over"
    # the variant/seed directory it is in: RUN/VARIANT/seedS (RUN written by factmem)
    seed_dir = next((p for p in path.parents
                     if SEED_DIR_PATTERN.fullmatch(p.name) and owns(p.parent.parent)), None)
    resume = next((p for p in path.parents if p.parent.name == RESUME_DIR), None)
    if seed_dir is not None and resume is not None and seed_dir in resume.parents:
        stage = resume.parent.parent  # resume/step-N/... or resume/final/...
        if resume.name.startswith(STEP_PREFIX):
            return (f"delete {resume} {again} (stage {stage.name[3:]} of "
                    f"{_seed_label(seed_dir)} restarts from its beginning), {restart}")
        return f"delete {resume} {again} ({_seed_label(seed_dir)} is trained again), {restart}"
    if seed_dir is not None:
        return f"delete {seed_dir} {again} ({_seed_label(seed_dir)} is trained again), {restart}"
    if path.parent.name == ANALYSIS_DIR:
        return f"delete {path} and run `factmem analyze` again"
    if path.name in (CONFIG_FILE, RESOLVED_FILE):
        return "pass --restart to start the run over, or --output DIR to write elsewhere"
    return f"delete {path} {again} (it is written anew), {restart}"


def _seed_label(seed_dir: Path) -> str:
    return f"{seed_dir.parent.name}/{seed_dir.name}"


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
    with reading(path / MODEL_WEIGHTS):
        load_model(model, str(path / MODEL_WEIGHTS))
    with reading(path / TORCH_RNG):
        torch.set_rng_state(load_file(str(path / TORCH_RNG))["torch"])
    set_host_rng_state(read_json(path / STATE_FILE)["rng"])


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
    return read_json(mine if mine.is_file() else path / RANK_FILE.format(rank=0))


# the Python/NumPy part of a stage's RNG state (torch's is a tensor, saved beside): one
# implementation, in distributed.py, which also writes each rank's full state
host_rng_state = dist.host_rng_state
set_host_rng_state = dist.set_host_rng_state
