"""Ctrl-C during training: finish the current step, save a checkpoint, stop.

The runner (runner.py) asks `StopRequest.requested` between steps, summed over the
processes so that every rank stops after the same step; `TrainingInterrupted` carries the
message the CLI prints (exit 130).
"""

from __future__ import annotations

import os
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C handled: the message says what was saved and how to continue."""


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops
    at once, like an unhandled Ctrl-C (the last complete checkpoint is still intact)."""

    def __init__(self, announce: bool):
        self.requested, self.announce, self.previous = False, announce, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            # os.write, not print: a handler that writes to a stream the loop is writing to
            # would fail with "reentrant call".
            os.write(2, b"\nCtrl-C: stopping after this step to save a checkpoint "
                        b"(Ctrl-C again to stop at once)\n")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
