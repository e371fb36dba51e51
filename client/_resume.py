"""Reads that ride through a server restart: a read is retried, a batch stream resumes at its cursor.

Under the datasource's :class:`~patchwire.client.RetryPolicy` (exponential backoff with full jitter, within a time
budget) a read or stream that failed because the server was unreachable, restarting or stopping is repeated
(:func:`patchwire.client._retry.retriable` for reads). A deadline that passed, or keepalive pings left unanswered,
is not retried: that server is wedged, not restarting (see :mod:`._timeouts`). A stream's epoch order depends on
(seed, epoch) alone, so a new call that starts at the position of the first sample not yet delivered continues
the same epoch: no sample is lost or delivered twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from patchwire.client._decoding import DecodedBatch
from patchwire.client._errors import DeadlineExceeded, PatchwireError, translate_rpc_errors
from patchwire.client._retry import Outage, RetryPolicy, retriable

__all__ = ["read_with_retries", "resumed_stream"]

T = TypeVar("T")


def _worth_retrying(exc: PatchwireError) -> bool:
    # (keepalive pings left unanswered are raised as DeadlineExceeded too: see _errors.from_grpc)
    return not isinstance(exc, DeadlineExceeded) and retriable(exc, read=True)


class _Failures:
    """The failed attempts of one read: waits between them under ``policy``; counts each retry on ``retried``."""

    def __init__(self, policy: RetryPolicy, address: str, what: str, retried: Callable[[], None]) -> None:
        self._policy, self._address, self._what, self._retried = policy, address, what, retried
        self._outage: Outage | None = None

    def failed(self, exc: PatchwireError) -> None:
        """Returns after the wait before the next attempt; raises ``exc`` when it is not worth retrying (or
        retrying is off), RetriesExhausted when the budget is spent."""
        if self._policy.budget_s == 0 or not _worth_retrying(exc):
            raise exc
        self._outage = self._outage or Outage(self._policy, self._address, self._what)
        self._outage.failed(exc)
        self._retried()

    def succeeded(self) -> None:
        """An answer arrived: a later failure starts a new outage with a full budget."""
        self._outage = None


def read_with_retries(
    policy: RetryPolicy, address: str, what: str, call: Callable[[], T], retried: Callable[[], None]
) -> T:
    """``call()`` with gRPC errors translated, repeated while it fails with a retriable error."""
    failures = _Failures(policy, address, what, retried)
    while True:
        try:
            with translate_rpc_errors(what):
                return call()
        except PatchwireError as exc:
            failures.failed(exc)


def resumed_stream(
    open_stream: Callable[[int], Iterator[DecodedBatch]],
    start_position: int,
    policy: RetryPolicy,
    address: str,
    what: str,
    retried: Callable[[], None],
) -> Iterator[DecodedBatch]:
    """The batches of ``open_stream(start_position)``; a stream that breaks with a retriable error is opened again
    at ``start_position`` plus the samples already yielded."""
    failures = _Failures(policy, address, what, retried)
    delivered = 0
    while True:
        try:
            with translate_rpc_errors(what):
                for batch in open_stream(start_position + delivered):
                    failures.succeeded()
                    delivered += len(batch.sample_indices)
                    yield batch
            return
        except PatchwireError as exc:
            failures.failed(exc)
