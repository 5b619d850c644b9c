"""`factmem run --jobs N`: N variant/seeds at a time, each in a worker process of its own.

The parent is the process that holds the run directory's lock. It has prepared everything once
(factmem.experiment.prepare: sets built and filtered, every item tokenised) and starts one
spawned worker per variant/seed, at most N at once, each with torch limited to its share of the
cores (`--threads-per-job`, default cores // N). A variant/seed that copies its first stages from
another (factmem.reuse) starts once those stages are finished on disk.

A worker writes only its variant/seed's directory and its log, `RUN_DIR/logs/VARIANT/seedS.log`
(its warnings also reach the terminal). The parent prints one line per finished stage and per
finished variant/seed, writes timing.json as each ends, deletes kept weights once nothing is still
to copy them, and writes the summary and the comparison after the last. A worker that fails (or
dies) stops new ones from starting; those running finish, then the parent stops with one line
naming it. What finished stays, and the same command continues.

A result does not depend on the process that computed it: every variant/seed seeds its own
random number generators (factmem.seedrun.run_stages) and copies, rather than shares, the
stages of another. Workers are spawned, not forked (torch's threads and fork do not mix); they
ignore Ctrl-C (the parent stops them) and end themselves if the parent dies, whose lock a new run
could otherwise take over while they still write.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factmem import files, rundir
from factmem.errors import FactmemError
from factmem.reuse import ReusePlan, Unit, unit_name

if TYPE_CHECKING:
    from factmem.config import Experiment, ExperimentConfig
    from factmem.data import Example
    from factmem.sets import SetCache

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how often the parent looks for finished stages
STOP_SECONDS = 30.0  # how long a worker has to end after SIGTERM before it is killed


def check_jobs(jobs: int, threads: int | None) -> None:
    """Refuse job and thread counts that cannot run, before anything is read or written."""
    if jobs < 1:
        raise FactmemError(f"--jobs: must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise FactmemError(f"--threads-per-job: must be >= 1, got {threads}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if jobs > 1 and world > 1:
        raise FactmemError(f"--jobs {jobs}: under `accelerate launch` ({world} processes) every "
                           "process already takes part in every variant/seed; use either "
                           "--jobs or several processes, not both")


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_parallel(exp: Experiment, root: Path, cache: SetCache, reuse: ReusePlan,
                 timings: rundir.RunTimings, jobs: int, threads: int | None
                 ) -> dict[str, dict[int, dict[str, Any]]]:
    """Every variant/seed of `exp` in worker processes, `jobs` at a time: their accuracy
    records (variant -> seed -> record), in the config's order."""
    return Scheduler(exp, root, cache, reuse, timings, jobs,
                     threads or max(1, cores() // jobs)).run()


# --------------------------------------------------------------------------------------------
# The parent


@dataclass
class Task:
    """One variant/seed, as a worker gets it (pickled into the spawned process)."""

    cfg: ExperimentConfig
    variant: str
    seed: int
    sets: dict[str, list[Example]]
    out: Path
    log_file: Path
    reuse: ReusePlan
    threads: int
    parent: int  # the parent's process id: the worker ends if it changes
    log_level: int

    @property
    def name(self) -> str:
        return f"{self.variant} seed{self.seed}"


@dataclass
class Worker:
    """A running worker, as the parent sees it."""

    task: Task
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection  # the worker sends one message: ("done", seconds) or ("failed", line)
    reported: int  # its finished stages the parent has printed


class Scheduler:
    def __init__(self, exp: Experiment, root: Path, cache: SetCache, reuse: ReusePlan,
                 timings: rundir.RunTimings, jobs: int, threads: int):
        self.exp, self.root, self.cache, self.reuse = exp, root, cache, reuse
        self.timings, self.jobs, self.threads = timings, jobs, threads
        self.paths = rundir.RunPaths(root)
        self.ctx = multiprocessing.get_context("spawn")
        self.records: dict[Unit, dict[str, Any]] = {}
        self.pending: list[Unit] = []  # in the config's order
        self.running: dict[Unit, Worker] = {}
        self.failures: list[str] = []

    def run(self) -> dict[str, dict[int, dict[str, Any]]]:
        for vname, cfg in self.exp.variants.items():
            for seed in cfg.seeds:
                out = self.paths.seed_dir(vname, seed)
                if rundir.is_seed_finished(out):
                    self.records[(vname, seed)] = files.read_json(rundir.accuracy_file(out))
                    self.timings.keep_earlier(unit_name((vname, seed)), cfg, out)
                else:
                    self.timings.begin(unit_name((vname, seed)), cfg, out)
                    self.pending.append((vname, seed))
        log.info("%d variant/seed runs to do (%d finished earlier), %d jobs of %d torch "
                 "thread(s) each; worker logs in %s", len(self.pending), len(self.records),
                 self.jobs, self.threads, self.root / rundir.LOGS_DIR)
        try:
            self.loop()
        finally:
            self.stop_all()  # only if the parent itself is stopped (Ctrl-C, an error)
        if self.failures or self.pending:
            raise FactmemError(self.failure_line())
        return {v: {s: self.records[(v, s)] for s in cfg.seeds}
                for v, cfg in self.exp.variants.items()}

    def loop(self) -> None:
        while True:
            if not self.failures:
                self.start_ready()
            if not self.running:
                return
            wait([w.process.sentinel for w in self.running.values()], timeout=POLL_SECONDS)
            for worker in list(self.running.values()):
                self.report_stages(worker)
                if not worker.process.is_alive():
                    self.end(worker)

    def start_ready(self) -> None:
        """Start pending variant/seeds whose copied stages are on disk, in order, up to
        `jobs` running."""
        for unit in list(self.pending):
            if len(self.running) >= self.jobs:
                return
            if self.reuse.source_ready(unit):
                self.pending.remove(unit)
                self.start(unit)

    def start(self, unit: Unit) -> None:
        variant, seed = unit
        cfg = self.exp.variants[variant]
        parent_level = logging.getLogger("factmem").getEffectiveLevel()
        task = Task(cfg, variant, seed, self.cache.sets(cfg), self.paths.seed_dir(variant, seed),
                    rundir.worker_log(self.root, variant, seed), self.reuse, self.threads,
                    os.getpid(), min(parent_level, logging.INFO))
        receive, send = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=work, args=(task, send), name=f"factmem {task.name}")
        process.start()
        send.close()  # the worker holds the sending end now
        self.running[unit] = Worker(task, process, receive, finished_stages(cfg, task.out))
        log.debug("started %s (process %d)", task.name, process.pid)

    def report_stages(self, worker: Worker) -> None:
        """One line per stage the worker finished since the last look."""
        done = finished_stages(worker.task.cfg, worker.task.out)
        for k in range(worker.reported, done):
            log.info("%s", self.stage_line(worker.task, k))
        worker.reported = max(worker.reported, done)

    def stage_line(self, task: Task, k: int) -> str:
        stage_dir = rundir.stage_path(task.out, task.cfg, k)
        head = f"{task.name} {task.cfg.stages[k].name}"
        if (stage_dir / rundir.REUSED_FROM_FILE).is_file():
            src = self.reuse.sources.get((task.variant, task.seed))
            return f"{head}: copied" + (f" from {unit_name(src.unit)}" if src else "")
        metrics = rundir.read_metrics(stage_dir)
        accs = ", ".join(f"{s} {m['accuracy']:.0%}" for s, m in metrics["eval"].items())
        return f"{head}: trained, {metrics.get('seconds', 0):.0f} s | {accs}"

    def end(self, worker: Worker) -> None:
        """A worker's process has ended: its record, or its failure."""
        task, unit = worker.task, (worker.task.variant, worker.task.seed)
        del self.running[unit]
        message = receive(worker.conn)
        worker.process.join()
        if message is not None and message[0] == "done":
            self.records[unit] = files.read_json(rundir.accuracy_file(task.out))
            self.timings.record(unit_name(unit), message[1])
            log.info("%s finished (%.0f s; %d of %d done, %d running)", task.name, message[1],
                     len(self.records), len(self.records) + len(self.pending) + len(self.running),
                     len(self.running))
        else:
            why = message[1] if message is not None else death(worker.process.exitcode)
            self.failures.append(f"{task.name} failed: {why} (log: {task.log_file})")
            if self.running:
                log.error("%s; no new variant/seed starts, the %d running finish first",
                          self.failures[-1], len(self.running))
        self.reuse.sweep(busy=self.running)

    def stop_all(self) -> None:
        """Stop the workers still running (SIGTERM, then SIGKILL): they continue next time."""
        for worker in self.running.values():
            worker.process.terminate()
        for worker in self.running.values():
            worker.process.join(STOP_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self.running.clear()

    def failure_line(self) -> str:
        line = self.failures[0] if self.failures else "variant/seed runs were left waiting"
        if len(self.failures) > 1:
            line += f"; {len(self.failures) - 1} more failed (in the lines above)"
        if self.pending:
            line += f"; {len(self.pending)} not started"
        return line + "; finished variant/seeds are kept: the same command continues the run"


def finished_stages(cfg: ExperimentConfig, out: Path) -> int:
    """How many of the variant/seed's stages are finished (the base evaluation not counted)."""
    return max(0, len(rundir.finished_stage_dirs(cfg, out)) - 1)


def receive(conn: Connection) -> tuple[str, Any] | None:
    """The worker's one message, or None if it ended without sending it."""
    try:
        return conn.recv() if conn.poll() else None
    except EOFError:
        return None
    finally:
        conn.close()


def death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"its process was killed by signal {-exitcode}"
    return f"its process ended with exit code {exitcode} before finishing"


# --------------------------------------------------------------------------------------------
# A worker


def work(task: Task, conn: Connection) -> None:
    """A worker process: run one variant/seed, then send ("done", seconds) or ("failed", the
    error in one line; a traceback goes to the log)."""
    from factmem import signals

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    # SIGTERM (the parent stopping us, or a scheduler signalling the whole job): the step under
    # way finishes and a resumable checkpoint is written, as in a single-process run
    signals.handle_sigterm()
    watch_parent(task.parent)
    log_to(task)
    try:
        t0 = time.perf_counter()
        run_task(task)
        conn.send(("done", time.perf_counter() - t0))
    except signals.Terminated as e:
        log.warning("%s: stopped by SIGTERM: %s", task.name, e)
        conn.send(("failed", f"stopped by SIGTERM: {e}"))
    except FactmemError as e:
        log.error("%s", e)
        conn.send(("failed", str(e)))
    except Exception as e:  # noqa: BLE001 - a bug: reported by the parent, traceback in the log
        log.exception("%s failed", task.name)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_task(task: Task) -> None:
    import torch

    from factmem import distributed as dist
    from factmem.models import load_tokenizer
    from factmem.seedrun import run_variant_seed

    torch.set_num_threads(task.threads)
    run_variant_seed(task.cfg, task.variant, task.seed, task.sets, load_tokenizer(task.cfg.model),
                     dist.make_accelerator(), task.out, progress=False, reuse=task.reuse)


def watch_parent(parent: int) -> None:
    """End this process once its parent is gone: the run directory's lock names the parent, and
    a new run would take it over while this one still wrote."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="factmem-watch-parent", daemon=True).start()


def log_to(task: Task) -> None:
    """Everything to the worker's log file (appended across attempts); warnings to the terminal
    too, named (errors end the worker: the parent reports them)."""
    from factmem.logs import quiet_library_bars, quiet_library_loggers

    task.log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(task.log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.addFilter(lambda record: record.levelno == logging.WARNING)
    to_terminal.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {task.name}: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=task.log_level, handlers=[to_file, to_terminal], force=True)
    quiet_library_loggers()
    quiet_library_bars()
