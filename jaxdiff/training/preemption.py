"""Stopping a run cleanly on SIGTERM or SIGINT (preemption, Slurm, Kubernetes, Ctrl-C).

:class:`StopSignals` is a context manager that the training loop enters (nothing here installs
a handler on import). The first SIGTERM or SIGINT only sets a flag; the loop reads it at each
step boundary, agrees on it across hosts, saves and commits a checkpoint of that step and raises
:class:`Stopped`, which ``scripts/train.py`` turns into a one-line message and the exit code
``128 + signal`` (143 for SIGTERM, 130 for SIGINT, as a shell reports a process killed by it).
A second signal exits at once with the same code (the checkpoints already written stay intact).
Leaving the context restores the previous handlers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["StopSignals", "Stopped", "SIGNALS"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Raised by the training loop after it saved a checkpoint of ``step`` because of signal ``signum``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; its checkpoint is saved. "
                         f"Run the same command again to resume.")


class StopSignals:
    """Records the first of ``signals`` received while the context is active; a second one exits at once.

    Outside the main thread (where Python cannot install handlers) it records nothing.
    """

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping at the next step boundary after saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
