"""Ctrl-C and SIGTERM: how a run or a search is asked to stop, and ends resumable with one line."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fika.console import log


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, `kill`): handled as Ctrl-C is, so that a run or a search ends the
    same way, resumable, with one line."""


def interruption(signum: int) -> KeyboardInterrupt:
    """What a signal that stops fika raises: Terminated for SIGTERM, KeyboardInterrupt for Ctrl-C."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def exit_code(stopped_by: KeyboardInterrupt | str | None) -> int:
    """The exit code of a process stopped by a signal (the interruption raised, or the signal's name): 143 for
    SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(stopped_by, Terminated) or stopped_by == "SIGTERM" else 130


@contextlib.contextmanager
def stop_signals_handled(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Within it, Ctrl-C and SIGTERM call `handler(signum, frame)`; the handlers before it come back after. Signals
    are only the main thread's: elsewhere it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class StopAfterStep:
    """A training run's Ctrl-C and SIGTERM: the first one during training ends the run after the step it is on
    (with a checkpoint of that step when `train.checkpoints` is on: a preempted job loses no step); a second
    one, or one before training has started, stops at once."""

    def __init__(self):
        self.training = False
        self.signal: int | None = None
        self.told = False

    def __call__(self, signum, frame) -> None:
        if self.signal is not None or not self.training:
            raise interruption(signum)
        self.signal = signum

    def requested(self) -> str | None:
        """Asked by the run after each step: the signal's name once one came (says once, outside the handler, that
        the run is stopping), else None."""
        if self.signal is None:
            return None
        name = signal.Signals(self.signal).name
        if not self.told:
            self.told = True
            log(f"train: {name}: stopping after this step (again to stop at once)")
        return name
