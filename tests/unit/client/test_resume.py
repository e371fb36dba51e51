"""Reads and streams resumed through server outages: a stream broken by UNAVAILABLE is opened again at the first
position not yet delivered; deadlines and wedged servers are raised at once, never retried."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

import patchwire.client as pw
from patchwire.client._resume import read_with_retries, resumed_stream

from _checks import FakeRpcError

FAST = pw.RetryPolicy(budget_s=5.0, initial_backoff_s=0.001, max_backoff_s=0.001)
ORDER = [7, 3, 9, 1, 4, 8, 0, 2, 6, 5]  # an epoch's order on the server


def _server(breaks: dict[int, FakeRpcError]) -> tuple[list[int], Any]:
    """A fake StreamBatches in batches of 2 that fails (once) when it reaches a position in ``breaks``; records the
    start position of every call."""
    starts: list[int] = []

    def open_stream(position: int) -> Iterator[Any]:
        starts.append(position)
        for p in range(position, len(ORDER), 2):
            if p in breaks:
                raise breaks.pop(p)
            yield SimpleNamespace(sample_indices=ORDER[p : p + 2])

    return starts, open_stream


def test_a_broken_stream_resumes_at_the_first_sample_not_delivered() -> None:
    retries: list[int] = []
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    stopping = FakeRpcError(grpc.StatusCode.CANCELLED, "server stopping")
    starts, open_stream = _server({4: unavailable, 8: stopping})
    batches = resumed_stream(open_stream, 2, FAST, "host:1", "streaming", lambda: retries.append(1))
    delivered = [i for batch in batches for i in batch.sample_indices]
    assert delivered == ORDER[2:]  # each once, in order
    assert starts == [2, 4, 8] and len(retries) == 2


@pytest.mark.parametrize(
    "error",
    [
        FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Stream removed (ping timeout)"),
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "spec.extractor: bad"),
    ],
)
def test_deadlines_wedged_servers_and_refusals_are_raised_at_once(error: FakeRpcError) -> None:
    starts, open_stream = _server({2: error})
    with pytest.raises(pw.PatchwireError) as info:
        list(resumed_stream(open_stream, 0, FAST, "host:1", "streaming", lambda: None))
    assert info.value.__cause__ is error and starts == [0]
    if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        assert isinstance(info.value, pw.DeadlineExceeded)


def test_a_read_is_repeated_while_unavailable_and_not_at_all_when_retrying_is_off() -> None:
    failures = [FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")] * 2

    def call() -> str:
        if failures:
            raise failures.pop()
        return "answer"

    retries: list[int] = []
    assert read_with_retries(FAST, "host:1", "reading", call, lambda: retries.append(1)) == "answer"
    assert len(retries) == 2
    failures.append(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    with pytest.raises(pw.ServerUnavailable):
        read_with_retries(pw.RetryPolicy(budget_s=0), "host:1", "reading", call, lambda: None)
