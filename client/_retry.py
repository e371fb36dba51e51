"""Retrying calls through a server restart: exponential backoff with full jitter, within a time budget.

A ``patchwire serve`` that is stopped lets running calls finish for its grace period (``--grace``, 5 s by default),
then cancels them; a new server on the same address answers once it has started. :class:`RetryPolicy`'s default
budget (5 minutes) covers that, and a replica that Kubernetes restarts: a pod rescheduled onto another node, its
assembly volume attached there and its jobs recovered from their journals (an assembly job's calls wait for their
home replica: :mod:`patchwire.client._replicas`; streams move to another replica at once). Only failures that say
nothing reached the server's state, or that the call may be repeated without effect, are retried:

- UNAVAILABLE: no server answers (connection refused or reset), or the server cancelled the call while stopping;
  also no replica of a job's home answering anywhere yet;
- DEADLINE_EXCEEDED: the call took too long (for posting: a batch that was never acknowledged);
- for reads only, CANCELLED by the server: a stopping server cancels the streams still open when its grace period
  ends (events followed live, say), and reading again changes nothing;
- a prediction stream that the server ended before acknowledging every batch.

Posting predictions is idempotent (the server counts a sample index it has already received as a duplicate and
never applies it twice), creating a job names it up front (creating it again with the same parameters returns the
existing job), and reads (status, fetch, events, export) change nothing. Anything else, a rejected batch say, is
raised at once. When the budget runs out, :class:`~patchwire.client.RetriesExhausted` names the server and how long
it was tried.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from patchwire.client._errors import PatchwireError, RetriesExhausted, ServerUnavailable

__all__ = ["RECONNECT_OPTIONS", "Outage", "RetryPolicy", "call_with_retries", "retriable"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
RETRIABLE_READ_CODES = RETRIABLE_CODES | {grpc.StatusCode.CANCELLED}
CLOSED_HERE = "Channel closed!"
"""The details of the CANCELLED that gRPC gives the calls still open on a channel this process closes."""
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""Channel options: gRPC's own reconnection backoff (up to 120 s by default) would otherwise keep a channel failing
fast long after a restarted server listens again; a channel tries to reconnect at least once a second."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a client retries a call while its server is unreachable (e.g. restarting)."""

    budget_s: float = 300.0
    """Seconds from the first failure of a call (or of a batch's acknowledgement) until the client gives up with
    :class:`~patchwire.client.RetriesExhausted`; covers the server's default grace period (5 s) plus a restart, also
    a replica's pod rescheduled by Kubernetes with its volume. 0 disables retrying."""
    initial_backoff_s: float = 0.1
    """Upper bound of the first wait; the bound doubles with every failed attempt."""
    max_backoff_s: float = 2.0
    """The bound stops growing here; a wait is drawn uniformly from [0, bound] ("full jitter"), so clients that
    lost the same server do not all come back at once."""

    def __post_init__(self) -> None:
        if self.budget_s < 0 or self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"RetryPolicy needs budget_s >= 0 and 0 < initial_backoff_s <= max_backoff_s, got {self.budget_s}, "
                f"{self.initial_backoff_s}, {self.max_backoff_s}"
            )

    def bound(self, attempt: int) -> float:
        """The upper bound of the wait after the ``attempt``-th failure (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(attempt - 1, 64))


def retriable(exc: BaseException, read: bool = False) -> bool:
    """Whether ``exc`` (a gRPC error, or a patchwire error raised from one) is a failure worth retrying; ``read``:
    for a call that changes nothing on the server."""
    if isinstance(exc, ServerUnavailable) and exc.__cause__ is None:
        return True  # (no gRPC call made: the client found no replica to send it to)
    if isinstance(exc, PatchwireError) and isinstance(exc.__cause__, grpc.RpcError):
        exc = exc.__cause__
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        if exc.code() == grpc.StatusCode.CANCELLED and exc.details() == CLOSED_HERE:
            return False  # this process closed the channel (a datasource closed under its read-ahead): not an outage
        return exc.code() in (RETRIABLE_READ_CODES if read else RETRIABLE_CODES)
    return False


class Outage:
    """The failed attempts of one call: waits between them, and raises once the budget is spent.

    ``clock``, ``sleep`` and ``rng`` are injectable so that the schedule can be checked without waiting."""

    def __init__(
        self,
        policy: RetryPolicy,
        address: str,
        what: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.address = address
        self.what = what
        self.failures = 0
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._started = clock()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    def failed(self, exc: BaseException) -> None:
        """Records a failed attempt; waits before the next one, or raises RetriesExhausted (from ``exc``) once
        the budget is spent."""
        self.failures += 1
        remaining = self.policy.budget_s - self.elapsed_s
        if remaining <= 0:
            raise RetriesExhausted(self.what, self.address, self.elapsed_s, self.failures, _reason(exc)) from exc
        delay = min(remaining, self._rng.uniform(0.0, self.policy.bound(self.failures)))
        _log.log(
            logging.WARNING if self.failures == 1 else logging.INFO,  # one warning per outage, then quieter
            "%s: server %s unavailable (%s); retry %d in %.2f s (%.1f s of %.0f s spent)",
            self.what,
            self.address,
            _reason(exc),
            self.failures,
            delay,
            self.elapsed_s,
            self.policy.budget_s,
        )
        self._sleep(delay)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, PatchwireError) else exc
    if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
        return f"{cause.code().name}: {cause.details()}"
    return str(exc) or type(exc).__name__


def call_with_retries(policy: RetryPolicy, address: str, what: str, call: Callable[[], T], read: bool = False) -> T:
    """``call()``, retried while it fails with a retriable error (see :func:`retriable`) within the budget."""
    outage: Outage | None = None
    while True:
        try:
            return call()
        except (grpc.RpcError, PatchwireError) as exc:
            if not retriable(exc, read):
                raise
            outage = outage or Outage(policy, address, what)
            outage.failed(exc)
