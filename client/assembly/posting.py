"""The posting window: batches sent on one PostPredictions stream, at most ``window`` of them unacknowledged,
acknowledgements read in order, and every unacknowledged batch sent again on a new stream after a dropped one (under
the assembler's :class:`~patchwire.client.RetryPolicy`; posting is idempotent on the server).

A stream's request thread waits inside the gRPC call for the next batch, and a process must not fork while a thread
is inside gRPC (gRPC waited a minute and then forked without its fork handlers, and a DataLoader worker forked that
way could crash). So before a fork every window of the process closes its stream, once its batches in flight are
acknowledged; the next batch opens a new one."""

from __future__ import annotations

import collections
import logging
import os
import queue
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from patchwire.client._connection import Connection
from patchwire.client._errors import ConnectionFailed, RetriesExhausted, translate_rpc_errors
from patchwire.client._retry import Outage, RetryPolicy
from patchwire.v1 import assembly_service_pb2 as apb

__all__ = ["GrpcPostStream", "PostStream", "PostingWindow", "Request"]

Request = apb.PostPredictionsRequest | bytes
"""One message of a PostPredictions stream; chunk messages travel pre-serialised."""

_log = logging.getLogger(__name__)
_windows: weakref.WeakSet[PostingWindow] = weakref.WeakSet()


class PostStream(Protocol):
    """One PostPredictions stream: requests in, one acknowledgement per batch out, in order."""

    def put(self, requests: Sequence[Request]) -> None: ...

    def next_ack(self) -> apb.PostPredictionsResponse:
        """The next acknowledgement; StopIteration where the stream ended, gRPC errors as they come."""
        ...

    def close(self) -> None: ...


class GrpcPostStream:
    """A PostStream over a connection: requests go through a queue, acknowledgements are read one per batch. Where
    the call cannot even be made (a job's home replica not found yet), that failure is raised by :meth:`next_ack`,
    where the window retries it."""

    def __init__(self, connection: Connection) -> None:
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._responses: Any = None
        self._failure: ConnectionFailed | None = None
        try:
            self._responses = connection.post_predictions()(iter(self._queue.get, None))
        except ConnectionFailed as exc:
            self._failure = exc

    def put(self, requests: Sequence[Request]) -> None:
        for r in requests:
            self._queue.put(r)

    def next_ack(self) -> apb.PostPredictionsResponse:
        if self._responses is None:
            assert self._failure is not None
            raise self._failure
        response: apb.PostPredictionsResponse = next(self._responses)
        return response

    def close(self) -> None:
        self._queue.put(None)
        if self._responses is not None:
            self._responses.cancel()


class PostingWindow:
    """Sends batches (each a list of requests) and reads their acknowledgements in order.

    ``open_stream``: a new stream (at the first batch and after a dropped one). ``address``: the server's, for
    errors (or a function that says it now: a job's home may move). ``describe``: what posting is, for
    error messages (e.g. which job). ``resending``: called with the unacknowledged batches before they are sent again
    (a transport points them at what it registered anew). ``acknowledged``: called with each acknowledgement.
    ``accepted_samples``, ``duplicate_samples`` and ``resent_batches`` count the samples the server took, those it
    already had, and the batches sent again."""

    def __init__(
        self,
        open_stream: Callable[[], PostStream],
        address: str | Callable[[], str],
        window: int = 1,
        retry: RetryPolicy | None = None,
        describe: Callable[[], str] = lambda: "posting predictions",
        resending: Callable[[Sequence[list[Request]]], None] = lambda batches: None,
        acknowledged: Callable[[apb.PostPredictionsResponse], None] = lambda response: None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.retry = retry or RetryPolicy()
        self.accepted_samples = 0
        self.duplicate_samples = 0
        self.resent_batches = 0
        self.last_ack: apb.PostPredictionsResponse | None = None
        self._open_stream = open_stream
        self._address = address
        self._describe = describe
        self._resending = resending
        self._acknowledged = acknowledged
        self._stream: PostStream | None = None
        self._inflight: collections.deque[list[Request]] = collections.deque()
        self._pid = os.getpid()
        self._deferred: BaseException | None = None
        _windows.add(self)

    @property
    def address(self) -> str:
        """The server's address now."""
        return self._address if isinstance(self._address, str) else self._address()

    @property
    def unacknowledged(self) -> int:
        """Batches sent and not acknowledged yet."""
        return len(self._inflight)

    def post(self, requests: list[Request], last_batch: bool = False) -> None:
        """Sends a batch; waits for acknowledgements while ``window`` batches are unacknowledged (all of them after
        a last batch)."""
        self._raise_deferred()
        self._inflight.append(requests)
        if self._stream is None:
            self._stream = self._open_stream()
        self._stream.put(requests)
        while self._inflight and (last_batch or len(self._inflight) >= self.window):
            self._read_ack()

    def flush(self) -> None:
        """Waits until every batch sent so far is acknowledged (durable on the server)."""
        self._raise_deferred()
        while self._inflight:
            self._read_ack()

    def _read_ack(self) -> None:
        """Reads the oldest batch's acknowledgement. A dropped connection (the server unreachable, restarting, or
        ending the stream early) is retried under ``self.retry`` by re-sending every unacknowledged batch; a batch the
        server rejects raises, and the batches sent after it (which the server never read) are sent again first."""
        what = self._describe()
        outage: Outage | None = None
        while True:
            try:
                with translate_rpc_errors(what):
                    assert self._stream is not None
                    response = self._stream.next_ack()
                break
            except (ConnectionFailed, StopIteration) as exc:
                # ConnectionFailed is UNAVAILABLE or DEADLINE_EXCEEDED: the batches in flight were not acknowledged
                self.close()
                failure = exc if isinstance(exc, ConnectionFailed) else ConnectionFailed(f"{what}: stream ended early")
                outage = outage or Outage(self.retry, self.address, what)
                try:
                    outage.failed(failure)
                except RetriesExhausted:
                    self._inflight.clear()
                    raise
                self.resent_batches += len(self._inflight)
                self._resend()
            except BaseException:
                self.close()
                self._inflight.popleft()
                self._resend()
                raise
        self._inflight.popleft()
        self.last_ack = response
        self.accepted_samples += response.accepted_samples
        self.duplicate_samples += response.duplicate_samples
        self._acknowledged(response)

    def _resend(self) -> None:
        if self._inflight:
            self._resending(list(self._inflight))
            self._stream = self._open_stream()
            for requests in self._inflight:
                self._stream.put(requests)

    def _raise_deferred(self) -> None:
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc

    def before_fork(self) -> None:
        """Closes the stream once the batches in flight are acknowledged; an error that raises then is raised by the
        next ``post`` or ``flush``."""
        if self._stream is None or self._pid != os.getpid():
            return
        try:
            while self._inflight:
                self._read_ack()
        except BaseException as exc:  # (a fork hook must not fail the fork: kept for the caller)
            self._deferred = exc
        self.close()

    def close(self) -> None:
        """Closes the stream (a later batch opens a new one); unacknowledged batches stay counted."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _before_fork() -> None:
    for window in list(_windows):
        try:
            window.before_fork()
        except Exception:  # never fails the fork
            _log.exception("could not close a posting stream before a fork")


os.register_at_fork(before=_before_fork)
