"""Decoding ahead of the consumer: a thread that keeps up to ``depth`` decoded messages ready (the credit window).

Without it, a consumer that trains between batches leaves the stream idle: receiving and decoding (copying chunks
into the tensors' buffers) and the training step take turns. Measured on the benchmark's data (2 cores, batches of
16): axial slices with a 4 ms step per batch 2,200 -> 3,300 samples/s, 64^3 patches with a 30 ms step 280 -> 345;
with no work at all between batches a few percent slower (one more thread handing over). gRPC's own flow-control
window keeps the bytes coming meanwhile; this window bounds the decoded batches held in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

__all__ = ["prefetched"]

T = TypeVar("T")
_END = object()
_POLL_S = 0.1


def prefetched(make: Callable[[], Iterator[T]], depth: int, on_close: Callable[[], None]) -> Generator[T, None, None]:
    """Iterates ``make()`` in a background thread, at most ``depth`` items ahead, in order. An exception in the
    thread is raised here, at the position where it happened. Closing this iterator early calls ``on_close`` (which
    must make the source stop, e.g. cancel its call) and waits for the thread."""
    items: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make():
                if not offer(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(exc)
            return
        offer(_END)

    thread = threading.Thread(target=produce, name="patchwire-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        on_close()
        thread.join(timeout=30)
