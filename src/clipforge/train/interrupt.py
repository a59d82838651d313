"""Stopping a training run cleanly on SIGINT (Ctrl-C), SIGTERM (what schedulers send before they
kill a job) and SIGUSR1 (SLURM's advance warning, ``sbatch --signal=USR1@120``).

The first signal asks the run to stop: it finishes the step it is in, writes a checkpoint and
raises `Interrupted`, whose exit status is the shell's convention for a death by that signal,
128 + its number (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1 on Linux).  A second signal
stops at once, without a checkpoint: the previous one stays intact, since checkpoints are
written atomically.  Before the first step there is nothing to save, so the first signal stops
at once too.

Under ``torchrun`` a signal may reach one rank only, or each rank at a different step: the ranks
agree each step on whether any of them was asked to stop (`clipforge.distributed.max_over_ranks`),
so they stop after the same step and write one checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType

from clipforge.data.batches import STOP_SIGNALS as SIGNALS

__all__ = ["SIGNALS", "Interrupted", "StopRequests", "exit_status"]


def exit_status(signum: int) -> int:
    """The shell's exit status for a process ended by signal ``signum``: 128 + its number."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal.  ``step`` and ``checkpoint``: the checkpoint written at the stop
    (None when it stopped at once, without one).  A KeyboardInterrupt, so that no ``except
    Exception`` on the way out swallows it."""

    def __init__(self, signum: int, *, step: int | None = None, checkpoint: str | None = None,
                 at_once: bool = False, main_process: bool = True) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.at_once, self.main_process = at_once, main_process
        super().__init__(self.describe())

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)

    def describe(self) -> str:
        if self.at_once:
            return f"stopped at once by {self.name}, without a checkpoint (the earlier ones are intact)"
        return f"stopped by {self.name} after step {self.step}; checkpoint {self.checkpoint}"


class StopRequests:
    """Signal handlers for a training run, active inside a ``with`` block and restored after it.

    ``signum`` is the first signal received (0: none).  Installed only in the main thread (the only
    one Python lets set handlers): a run started from another thread keeps the handlers it found.
    ``running`` is set once the first step has started; before it, a signal stops at once.
    """

    def __init__(self, *, label: str = "clipforge train") -> None:
        self.signum = 0
        self.running = False
        self.label = label
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _say(self, text: str) -> None:
        # os.write, not print: a handler runs between two bytecodes of the main thread, which may be
        # inside a print to stderr itself (the progress bar), and a buffered stream is not reentrant
        os.write(2, f"{self.label}: {text}\n".encode())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked child (a data loader worker before its own handlers are set) leaves it to the run
        if self.signum or not self.running:
            raise Interrupted(signum, at_once=True)
        self.signum = signum
        self._say(f"{signal_name(signum)}: finishing this step, then writing a checkpoint "
                  "(send it again to stop at once)")

