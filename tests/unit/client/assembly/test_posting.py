"""The posting window against a fake PostPredictions stream: acknowledgements read in order, at most ``window``
batches unacknowledged, every unacknowledged batch sent again after a dropped stream, and a rejected batch raised
with the batches after it sent again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from patchwire.client import ConnectionFailed, InvalidArgumentError, RetriesExhausted, RetryPolicy, ServerUnavailable
from patchwire.client.assembly.posting import GrpcPostStream, PostingWindow, Request
from patchwire.v1 import assembly_service_pb2 as apb

FAST = RetryPolicy(budget_s=30.0, initial_backoff_s=0.001, max_backoff_s=0.001)


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeServer:
    """Acknowledges each batch a stream was given, in order, with (accepted, duplicate) from the batch's indices:
    an index seen before is a duplicate. ``faults``: what to raise instead of the n-th acknowledgement read (counted
    over all streams), e.g. a dropped stream; ``reject``: sample indices whose batch is refused."""

    def __init__(self, faults: dict[int, BaseException] | None = None, reject: int | None = None) -> None:
        self.faults = faults or {}
        self.reject = reject
        self.streams: list[FakeStream] = []
        self.seen: set[int] = set()
        self.reads = 0

    def open(self) -> FakeStream:
        stream = FakeStream(self)
        self.streams.append(stream)
        return stream


class FakeStream:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.batches: list[apb.PredictionBatch] = []
        self.acked = 0
        self.closed = False

    def put(self, requests: Sequence[Request]) -> None:
        assert not self.closed
        self.batches.extend(r.batch for r in requests if isinstance(r, apb.PostPredictionsRequest))

    def next_ack(self) -> apb.PostPredictionsResponse:
        server = self.server
        server.reads += 1
        fault = server.faults.pop(server.reads, None)
        if fault is not None:
            raise fault
        if self.acked >= len(self.batches):
            raise StopIteration
        batch = self.batches[self.acked]
        self.acked += 1
        if server.reject is not None and server.reject in batch.sample_indices:
            raise _RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"sample {server.reject} is refused")
        indices = list(batch.sample_indices)
        duplicate = sum(i in server.seen for i in indices)
        server.seen.update(indices)
        return apb.PostPredictionsResponse(
            accepted_samples=len(indices) - duplicate, duplicate_samples=duplicate, ready_subjects=indices[-1:]
        )

    def close(self) -> None:
        self.closed = True


def batch(*indices: int) -> list[Request]:
    return [apb.PostPredictionsRequest(batch=apb.PredictionBatch(job_id="j", sample_indices=indices))]


def window_on(server: FakeServer, window: int, **kwargs: Any) -> PostingWindow:
    return PostingWindow(server.open, "fake:1", window, kwargs.pop("retry", FAST), **kwargs)


def test_acknowledgements_are_read_in_order_and_counted() -> None:
    server = FakeServer()
    acks: list[apb.PostPredictionsResponse] = []
    posting = window_on(server, 1, acknowledged=acks.append)
    for k in range(3):
        posting.post(batch(2 * k, 2 * k + 1))
        assert posting.unacknowledged == 0  # window 1: each post returns with its acknowledgement
    assert [list(a.ready_subjects) for a in acks] == [[1], [3], [5]]
    assert (posting.accepted_samples, posting.duplicate_samples, posting.resent_batches) == (6, 0, 0)
    assert posting.last_ack is acks[-1]
    assert len(server.streams) == 1


@pytest.mark.parametrize("window", [2, 4])
def test_at_most_window_minus_one_batches_wait_after_a_post(window: int) -> None:
    server = FakeServer()
    posting = window_on(server, window)
    for k in range(10):
        posting.post(batch(k))
        assert posting.unacknowledged <= window - 1
    assert posting.unacknowledged == window - 1
    posting.post(batch(10), last_batch=True)  # a last batch waits for every acknowledgement
    assert posting.unacknowledged == 0 and posting.accepted_samples == 11


def test_flush_waits_for_every_acknowledgement() -> None:
    server = FakeServer()
    posting = window_on(server, 8)
    for k in range(5):
        posting.post(batch(k))
    assert posting.unacknowledged == 5
    posting.flush()
    assert posting.unacknowledged == 0 and posting.accepted_samples == 5


@pytest.mark.parametrize(
    "fault",
    [StopIteration(), _RpcError(grpc.StatusCode.UNAVAILABLE, "gone")],
    ids=["stream-ended-early", "unavailable"],
)
def test_a_dropped_stream_sends_every_unacknowledged_batch_again(fault: BaseException) -> None:
    server = FakeServer(faults={2: fault})  # the second acknowledgement never comes
    resent: list[list[list[Request]]] = []
    posting = window_on(server, 3, resending=lambda batches: resent.append(list(batches)))
    for k in range(4):
        posting.post(batch(k))
    posting.flush()
    assert len(server.streams) == 2 and server.streams[0].closed
    assert [list(b.sample_indices) for b in server.streams[1].batches] == [[1], [2], [3]]
    assert len(resent) == 1 and len(resent[0]) == 3  # (batches 1 to 3 were in flight when the stream dropped)
    assert posting.resent_batches == 3
    # the server had not acknowledged them, so it counts them once
    assert (posting.accepted_samples, posting.duplicate_samples) == (4, 0)


def test_retries_end_with_retries_exhausted_and_nothing_in_flight() -> None:
    server = FakeServer(faults={1: StopIteration()})
    posting = window_on(server, 1, retry=RetryPolicy(budget_s=0.0))
    with pytest.raises(RetriesExhausted) as caught:
        posting.post(batch(0))
    assert isinstance(caught.value.__cause__, ConnectionFailed)
    assert posting.unacknowledged == 0


def test_a_rejected_batch_raises_and_the_batches_after_it_are_sent_again() -> None:
    server = FakeServer(reject=1)
    posting = window_on(server, 2)
    posting.post(batch(0))
    posting.post(batch(1))  # refused, read when the third batch fills the window again
    with pytest.raises(InvalidArgumentError, match="sample 1 is refused"):
        posting.post(batch(2))
    assert len(server.streams) == 2 and server.streams[0].closed
    assert [list(b.sample_indices) for b in server.streams[1].batches] == [[2]]
    posting.flush()
    assert posting.unacknowledged == 0
    assert posting.accepted_samples == 2 and posting.resent_batches == 0


def test_window_is_checked() -> None:
    with pytest.raises(ValueError, match="window must be at least 1, got 0"):
        window_on(FakeServer(), 0)


class _Acks:
    """A PostPredictions call: one acknowledgement per batch request it reads."""

    def __init__(self, requests: Any) -> None:
        self._requests = requests

    def __next__(self) -> apb.PostPredictionsResponse:
        request = next(self._requests)
        return apb.PostPredictionsResponse(accepted_samples=len(request.batch.sample_indices))

    def cancel(self) -> None:
        pass


class _HomeAway:
    """A connection to a job's home that is not found for its first ``away`` calls (ServerUnavailable, raised by
    the connection itself when no replica of that name answers)."""

    def __init__(self, away: int) -> None:
        self.away = away
        self.opened = 0
        self.address = "replica 'r1' of dns:///x:1"

    def post_predictions(self) -> Any:
        self.opened += 1
        if self.opened <= self.away:
            raise ServerUnavailable(f"no replica 'r1' answers at dns:///x:1 ({self.opened})")
        return _Acks


def test_a_stream_that_cannot_be_opened_yet_is_retried_where_acknowledgements_are_read() -> None:
    home = _HomeAway(away=2)
    connection: Any = home
    posting = PostingWindow(lambda: GrpcPostStream(connection), lambda: home.address, 1, FAST)
    posting.post(batch(0, 1))
    posting.post(batch(2))
    assert home.opened == 3 and posting.accepted_samples == 3
    assert posting.resent_batches == 2  # the first batch, once per stream that could not be opened
    home.away, home.address = 10, "127.0.0.1:7001"
    posting.close()
    posting.retry = RetryPolicy(budget_s=0.0)
    with pytest.raises(RetriesExhausted) as caught:
        posting.post(batch(3))
    assert caught.value.address == "127.0.0.1:7001"  # the address as it is when the retries end
