"""Streams decode ahead of their consumer in a thread: same batches in the same order, bounded, errors raised where
they happened, and nothing left running when the consumer stops early."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from patchwire.client._prefetch import prefetched


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "patchwire-prefetch"]


def test_the_producer_runs_ahead_to_fill_the_window_and_no_further() -> None:
    """With a window of 3 the producer keeps 3 items queued plus the one it waits to queue: it makes item k only
    once the consumer has taken k - 4 (checked at every item), and it does run that far ahead (waited for, no
    sleeping)."""
    depth = 3
    taken = 0
    taken_when_made: list[int] = []
    filled = threading.Event()

    def source() -> Iterator[int]:
        for i in range(50):
            taken_when_made.append(taken)
            if i == 1 + depth:
                filled.set()
            yield i

    closed: list[bool] = []
    items = prefetched(source, depth, lambda: closed.append(True))
    assert next(items) == 0
    taken = 1
    assert filled.wait(timeout=30), "the producer did not fill the window ahead of the consumer"
    rest = []
    for item in items:
        rest.append(item)
        taken += 1
    assert rest == list(range(1, 50))
    assert all(t >= k - depth - 1 for k, t in enumerate(taken_when_made)), taken_when_made
    assert closed == [True]


def test_an_error_is_raised_where_it_happened() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise LookupError("the third item is missing")

    items = prefetched(source, 2, lambda: None)
    assert next(items) == 1
    assert next(items) == 2
    with pytest.raises(LookupError, match="the third item"):
        next(items)
    assert not _prefetch_threads()
