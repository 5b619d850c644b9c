"""SIGTERM stops a run cleanly. Cluster schedulers send it before they kill (SLURM: SIGTERM, then
SIGKILL after KillWait, 30 s by default; Kubernetes: after terminationGracePeriodSeconds, 30 s).

While a run goes (`handle_sigterm`, called by `run_experiment`), SIGTERM becomes `Terminated`:
- during a stage's training steps it is noted and the step under way finishes; at its end a
  resumable checkpoint is written and `Terminated` is raised
  (factmem.train.checkpoint.CheckpointOnSigterm, which also marks where the steps begin and
  end; under several processes all stop at the same step);
- anywhere else (loading, evaluating, writing results) it is raised at once: the work under way
  is dropped, and what was finished is on disk already (every file is written atomically).
The run's `finally` blocks release the lock and close the trackers; the CLI prints one line and
exits with EXIT_STATUS (143 = 128 + SIGTERM, what a shell reports for a process SIGTERM ended).
The same command then continues the run.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(BaseException):
    """A SIGTERM stopped the run; the message says what was kept. A BaseException, as
    KeyboardInterrupt is, so that `except Exception` blocks let it through."""


class _State:
    received = False  # a SIGTERM came during this run
    training = 0  # > 0 inside a stage's training steps: the signal waits for the step's end


_state = _State()


def handle_sigterm() -> Callable[[], None]:
    """From now on SIGTERM raises `Terminated`; returns the function that puts the previous
    handler back. Only the main thread can install a handler: elsewhere the signal is left as
    it was."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _state.received, _state.training = False, 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
        _state.received, _state.training = False, 0

    return restore


def _on_sigterm(signum: int, frame: object) -> None:
    _state.received = True
    if not _state.training:
        raise Terminated("the work under way was dropped (finished stages are kept)")


def training_starts() -> None:
    """A stage's training steps begin: a SIGTERM now waits for the end of the step under way
    (where CheckpointOnSigterm saves and stops)."""
    _state.training += 1


def training_ends() -> None:
    """The stage's steps are over. A SIGTERM that came after the last step's end (at the
    epoch-end check, as the stage ended) stops the run here: the stage continues from its
    latest checkpoint."""
    _state.training = max(_state.training - 1, 0)
    if _state.received and not _state.training:
        raise Terminated("the stage under way continues from its latest checkpoint")


def requested() -> bool:
    """Whether a SIGTERM came during this run."""
    return _state.received
