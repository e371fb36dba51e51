"""Ctrl-C for commands that poll a server until they are interrupted (``patchwire status --watch``, ``top``).

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives, inside a gRPC call too,
where it can leave the channel's internal locks held: closing the channel afterwards then hangs, and the command with
it. :class:`Interrupt` turns the first SIGINT into a flag that the loop checks between polls (a poll in flight ends
first, within its deadline); a second SIGINT raises KeyboardInterrupt as usual, for a poll that will not end.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupt"]


class Interrupt:
    """``with Interrupt() as stop:`` ... ``if stop.wait(interval): return 130``. Outside the main thread (where no
    signal handler can be set) Ctrl-C stays KeyboardInterrupt."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._interrupted)
            self._installed = True
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._installed and signal.getsignal(signal.SIGINT) == self._interrupted:
            signal.signal(signal.SIGINT, self._previous)
        self._installed = False

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts whatever runs

    @property
    def interrupted(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleeps ``seconds`` or until Ctrl-C; whether Ctrl-C came (now or before)."""
        return self._event.wait(seconds)
