"""Deadlines and dead-server detection: no client call waits forever.

Every call with a bounded answer gets a deadline by its kind (:class:`Timeouts`). A stream of batches may rightly
last an epoch of hours, so it has none; instead the channel sends HTTP/2 keepalive pings while a call is open, and
a server that does not answer one within ``keepalive_timeout_s`` (stopped, wedged, behind a silent network
partition) ends the call. Both end as :class:`~patchwire.client.DeadlineExceeded` naming the server and the call,
and neither is retried: a server that answers nothing is not restarting, and another attempt would only double the
wait. A server that is alive but slow still answers pings, so a long computation is never mistaken for a dead one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """How long a client waits for each kind of call (seconds); give one to ``connect(..., timeouts=...)`` or to
    ``Client.datasource(..., timeouts=...)``. A datasource keeps its own in DataLoader workers."""

    unary_s: float = 30.0
    """Small requests: listing and describing datasets, opening a datasource, job status."""
    read_s: float = 60.0
    """A whole sample read: ``ds[i]``, ``get_samples``, ``direct_extract`` (big 3-D samples take longer than a
    describe; raise it for reads of very large subjects over a slow network)."""
    keepalive_s: float = 10.0
    """Idle time after which the channel pings the server (a ping needs no call in flight)."""
    keepalive_timeout_s: float = 10.0
    """How long a ping may go unanswered before the open calls fail: a dead server is found within
    ``keepalive_s + keepalive_timeout_s`` (20 s by default)."""

    def __post_init__(self) -> None:
        for name in ("unary_s", "read_s", "keepalive_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Timeouts.{name} must be positive, got {getattr(self, name)}")

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel options for the keepalive (the server is configured to accept pings this often)."""
        return [
            ("grpc.keepalive_time_ms", max(1, round(self.keepalive_s * 1000))),
            ("grpc.keepalive_timeout_ms", max(1, round(self.keepalive_timeout_s * 1000))),
            ("grpc.http2.ping_timeout_ms", max(1, round(self.keepalive_timeout_s * 1000))),  # (other pings: 60 s)
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
