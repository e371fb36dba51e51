"""The shared-memory resources one client process keeps across its datasources and assemblers: spare segments
(``SPARES``: the posting segment of the last assembler, the segments samples and subjects are fetched into), leases of
servers' memory (``LEASES``) and connections to servers' sockets (``CHANNELS``), with the fork hook that gives a
forked child none of its parent's and the exit hook that closes this process's connections; and :class:`Registrar`,
which registers this process's segments with a server."""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import numpy as np

from patchwire.client._connection import Connection
from patchwire.client._errors import RpcError
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import shared_memory

__all__ = [
    "CHANNELS",
    "LEASES",
    "SPARES",
    "UNUSABLE",
    "Channels",
    "FetchSegments",
    "Leases",
    "Registrar",
    "Registration",
    "Spares",
    "give_back_leases",
]

_log = logging.getLogger(__name__)
FETCH_SEGMENT_BYTES = 1 << 36
"""Nominal size of the segment a subject is fetched into: sparse, it uses memory only where the server writes (a
larger subject comes over the wire)."""
SPARE_POSTING_MAX = 1 << 30
"""A posting segment larger than this is closed with its assembler rather than kept for the next."""
RELEASE_TIMEOUT_S = 10.0
"""How long giving back leases of the server's memory may take (best effort)."""


class FetchSegments:
    """The segments subjects and samples are fetched into. A segment whose arrays are all gone is used again: the
    server then writes into pages this process already has, where fresh pages cost more than the copy itself on the
    machines measured. At most ``keep`` unused segments are kept (each holds the pages of the largest payloads
    fetched into it) and at most ``lent`` are tracked while their arrays live (each keeps a descriptor open).

    A segment is never used again where the server might still write into it (:meth:`retire`: a call that failed,
    whose server-side work may not have ended) or where another process may still read it: one lent out when this
    process forks is closed when its arrays are gone here (a forked child inherits the arrays and the mapping
    under them)."""

    def __init__(self, keep: int = 2, lent: int = 8) -> None:
        self._keep = keep
        self._lent_max = lent
        self._free: list[shared_memory.Segment] = []
        self._lent: set[shared_memory.Segment] = set()
        self._retired: set[shared_memory.Segment] = set()
        self._closed = False
        self._lock = threading.Lock()

    @property
    def free(self) -> tuple[shared_memory.Segment, ...]:
        """The unused segments kept, the next one taken last."""
        with self._lock:
            return tuple(self._free)

    def take(self) -> shared_memory.Segment:
        with self._lock:
            if self._free:
                return self._free.pop()
        # sealed against resizing: the server may then write through a mapping of its own (one copy, strided arrays
        # included) instead of pwrite (a contiguous copy first)
        return shared_memory.Segment(FETCH_SEGMENT_BYTES, sealed=True, name="patchwire-fetch")

    def lend(self, segment: shared_memory.Segment, length: int) -> mmap.mmap:
        """A mapping of the segment's first ``length`` bytes for arrays to view: the segment comes back to the pool
        when the last of them is gone (or is closed now if too many are out)."""
        mapping = segment.map(length)
        with self._lock:
            track = len(self._lent) < self._lent_max
            if track:
                self._lent.add(segment)
        if track:
            weakref.finalize(mapping, self._returned, segment)
        else:
            segment.close()
        return mapping

    def views(self, segment: shared_memory.Segment, offsets: Sequence[int], sizes: Sequence[int]) -> list[np.ndarray]:
        """The payloads the server wrote into ``segment``, in a mapping of their own (see :meth:`lend`)."""
        mapping = self.lend(segment, max(o + n for o, n in zip(offsets, sizes, strict=True)))
        return [np.frombuffer(mapping, dtype=np.uint8, count=n, offset=o) for o, n in zip(offsets, sizes, strict=True)]

    def _returned(self, segment: shared_memory.Segment) -> None:
        with self._lock:
            self._lent.discard(segment)
        self.give_back(segment)

    def retire(self, segment: shared_memory.Segment) -> None:
        """Never uses ``segment`` again: closes it now, or once its arrays are gone where it is lent out."""
        with self._lock:
            lent = segment in self._lent
            if lent:
                self._retired.add(segment)
        if not lent:
            segment.close()

    def give_back(self, segment: shared_memory.Segment) -> None:
        """A segment taken but not lent out (the fetch failed or came over the wire), or one whose arrays are gone."""
        with self._lock:
            retired = segment in self._retired
            self._retired.discard(segment)
            if not retired and not self._closed and len(self._free) < self._keep:
                self._free.append(segment)
                return
        segment.close()

    def before_fork(self) -> None:
        """The segments lent out now are shared with the child from here on: never used again by this process."""
        with self._lock:
            self._retired |= self._lent

    def close(self) -> None:
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for segment in free:
            segment.close()


class Spares:
    """Segments kept for later assemblers of this process: the posting segment of the last one closed (unless it is
    over ``SPARE_POSTING_MAX`` bytes) and the segments subjects are fetched into. A new assembler then writes into
    pages the process already has: fresh pages cost more than the copy itself on the machines measured. A forked
    child starts with none of them (its parent's segments are shared memory with the parent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posting: shared_memory.Segment | None = None
        self.fetching = FetchSegments()

    @property
    def posting(self) -> shared_memory.Segment | None:
        """The posting segment kept for the next assembler."""
        return self._posting

    def take_posting(self, nbytes: int) -> shared_memory.Segment | None:
        with self._lock:
            spare = self._posting
            if spare is None or spare.size - shared_memory.HEADER_BYTES < nbytes:
                return None
            self._posting = None
            return spare

    def give_posting(self, segment: shared_memory.Segment) -> None:
        with self._lock:
            keep = segment.size <= SPARE_POSTING_MAX and (self._posting is None or self._posting.size <= segment.size)
            old, self._posting = (self._posting, segment) if keep else (segment, self._posting)
        if old is not None:
            old.close()

    def forget(self) -> None:
        """In a forked child: closes this process's copies of the parent's segments, keeps none of them. (The child
        has one thread: locks another thread of the parent held at the fork are made anew, not waited for.)"""
        self._lock = threading.Lock()
        posting, self._posting = self._posting, None
        fetching, self.fetching = self.fetching, FetchSegments()
        fetching._lock = threading.Lock()
        fetching.close()
        if posting is not None:
            posting.close()


class Leases:
    """Leases of a server's memory (``SharedFile.lease``: a volume fetched by mapping the server's memfd) whose
    mappings are gone here, by server address, until they are given back (:func:`give_back_leases`: before a fetch,
    at ``delete`` and ``close``), so that the server may reuse that memory. A forked child inherits its parent's
    mappings and may still read them: a mapping made before a fork never gives its lease back (the server then frees
    that memory with the child's last mapping of it instead of reusing it)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # (a collection inside a locked block may unmap a volume: reentered)
        self._gone: dict[str, list[bytes]] = {}
        self.generation = 0

    @property
    def pending(self) -> int:
        """How many leases, of every server, wait to be given back."""
        with self._lock:
            return sum(len(leases) for leases in self._gone.values())

    def unmapped(self, address: str, lease: bytes, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self._gone.setdefault(address, []).append(lease)

    def take(self, address: str) -> list[bytes]:
        with self._lock:
            return self._gone.pop(address, [])

    def before_fork(self) -> None:
        self.generation += 1

    def forget(self) -> None:
        """In a forked child: its parent gives back its own leases."""
        self._lock = threading.RLock()
        self._gone = {}


class Channels:
    """This process's connections to servers' shared-memory sockets, one per server address (see
    :class:`patchwire.wire.shared_memory.Channel`). A forked child makes its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_address: dict[str, shared_memory.Channel] = {}

    def get(self, address: str) -> shared_memory.Channel | None:
        with self._lock:
            channel = self._by_address.get(address)
        return channel if channel is not None and channel.usable() else None

    def connect(self, address: str, path: str) -> shared_memory.Channel:
        """The channel to ``address``'s socket at ``path``: the one open, or a new one (a server restarted or moved
        its socket: the old connection is closed)."""
        with self._lock:
            channel = self._by_address.get(address)
            if channel is not None and channel.path == path and channel.usable():
                return channel
            new = shared_memory.Channel(path)
            self._by_address[address] = new
        if channel is not None and channel.pid == os.getpid():
            channel.close()
        return new

    def forget(self) -> None:
        """In a forked child: the parent's connections are the parent's: this process's copies of them are closed
        (the parent's stay open), so that the server drops the parent's regions as soon as the parent lets go."""
        self._lock = threading.Lock()
        channels, self._by_address = self._by_address, {}
        for channel in channels.values():
            channel.close_copy()

    def close(self) -> None:
        """At exit: this process's connections are closed (the server drops their regions at once)."""
        with self._lock:
            channels, self._by_address = self._by_address, {}
        for channel in channels.values():
            if channel.pid == os.getpid():
                channel.close()
            else:
                channel.close_copy()


def give_back_leases(connection: Connection) -> None:
    """Tells ``connection``'s server which of its memory this process no longer maps (best effort: memory whose lease
    never comes back is freed instead of reused)."""
    leases = LEASES.take(connection.address)
    if not leases:
        return
    try:
        connection.assembly.ReleaseSharedFiles(apb.ReleaseSharedFilesRequest(leases=leases), timeout=RELEASE_TIMEOUT_S)
    except grpc.RpcError as exc:
        _log.info("could not give back %d leases of the server's memory: %s", len(leases), exc)


UNUSABLE = (RpcError, OSError, shared_memory.SegmentError)
"""What registering a segment raises where shared memory cannot be used (then the transports fall back). A server
that stays unreachable raises ConnectionFailed, which is an OSError too: callers let it through first."""


class Registration(Protocol):
    def register(self, segment: shared_memory.Segment, for_posting: bool) -> bytes:
        """The region ``segment`` is registered as; raises one of ``UNUSABLE`` where it cannot be."""
        ...


class Registrar:
    """Registers segments with ``connection``'s server; ``retrying(what, call, read)`` makes the RPC under the
    assembler's retry policy."""

    def __init__(self, connection: Connection, retrying: Callable[..., Any]) -> None:
        self._connection = connection
        self._retrying = retrying

    def register(self, segment: shared_memory.Segment, for_posting: bool) -> bytes:
        """The region ``segment`` is registered as with the server: registered now where it is not yet (over this
        process's connection to the server's socket). Raises RpcError, OSError (the socket cannot be reached) or
        SegmentError (the server refused it, with the reason)."""
        address = self._connection.address
        channel = CHANNELS.get(address)
        region = None if channel is None else segment.region_on(channel)
        if region is not None:
            return region
        request = apb.RegisterSharedMemoryRequest(for_posting=for_posting)
        register = self._connection.assembly.RegisterSharedMemory
        timeout = self._connection.timeouts.unary_s
        response = self._retrying(
            "registering shared memory with the server", lambda: register(request, timeout=timeout), read=True
        )
        channel = CHANNELS.connect(address, response.socket_path)
        return segment.register(channel, response.ticket)


SPARES = Spares()
LEASES = Leases()
CHANNELS = Channels()
atexit.register(CHANNELS.close)


def _forget_in_child() -> None:
    SPARES.forget()
    LEASES.forget()
    CHANNELS.forget()


def _before_fork() -> None:
    LEASES.before_fork()
    SPARES.fetching.before_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_forget_in_child)
