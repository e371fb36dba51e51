"""Samples read through shared memory on the server's host: GetSamples has the server write the payloads into a
segment of this process's (``_shared_memory``) instead of sending them through gRPC, and only the small messages that
say where they lie travel.

Over gRPC a sample's bytes are copied six or seven times between the server's arrays and the client's (into chunk
messages, gRPC's buffers, the kernel's socket buffers both ways, Python bytes, the client's payload buffers); through
a segment once, by the server, straight from its (possibly strided) arrays into the segment, whose pages the
client's arrays then view (while a few segments are held by arrays a caller keeps, further calls copy their payloads
out into the process's page pool instead: kept samples pin a bounded amount of shared memory). Segments stay mapped
and are reused once their arrays are gone: their pages are touched once per process, not once per call (a fresh page
costs more than its copy on the virtual machines measured). Where no segment can be registered (another host or
container, a user id the server does not allow, shared memory off on the server, no ``memfd_create``) the process
reads over the wire from then on, as it does the messages that do not fit a segment.

A call that fails retires its segment (the server may still be writing into it), as does a fork for the segments
lent out then (the child may read them). A forked child starts with no segments of its own, but may claim one its
parent keeps for its children (:class:`Inheritance`): DataLoader workers, made afresh every epoch, find the pages of
the previous epoch's workers in place.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from patchwire.client import _shared_memory
from patchwire.client._connection import Connection
from patchwire.client._errors import ConnectionFailed, ProtocolError, translate_rpc_errors
from patchwire.wire import framing, shared_memory, tensors
from patchwire.wire.errors import WireError

__all__ = ["SEGMENT_BYTES", "Inheritance", "ReadSegments", "SharedReads", "Target"]

_log = logging.getLogger(__name__)
SEGMENT_BYTES = 1 << 36
"""Nominal size of a segment samples are read into: sparse, it uses memory only where the server writes (the
messages of a call beyond it come over the wire)."""
KEEP_BYTES = 64 << 20
"""A segment free again keeps the pages of its first 64 MiB (about a read-ahead window) and gives the rest back."""


def _direct(what: str, call: Any, read: bool = True) -> Any:
    with translate_rpc_errors(what):  # not retried: registration runs inside the read it serves, retried as a whole
        return call()


class Inheritance:
    """Segments a process that reads through shared memory keeps for the processes it forks: DataLoader workers are
    made afresh every epoch, and a worker that finds the pages of an earlier epoch's worker in place does not pay for
    fresh ones (on the 2-core benchmark machine a fresh page costs more than its copy). Each child claims one of its
    parent's segments no other process holds: it opens the memfd anew (a descriptor of its own) and takes an
    exclusive ``flock`` on that descriptor, which lasts until the child closes it or ends, so two children (of one
    epoch, or of two overlapping ones) never share a segment. The parent never reads into these itself; it keeps at
    most ``count`` of them, each holding at most the pages a child left in it (:data:`KEEP_BYTES`)."""

    def __init__(self, count: int = 8) -> None:
        self.count = count
        self.wanted = False
        """Set once this process has a datasource that reads through shared memory: only then are segments kept."""
        self._own: list[shared_memory.Segment] = []
        self._inherited: list[shared_memory.Segment] = []

    def before_fork(self) -> None:
        if not self.wanted or not shared_memory.available():
            return
        while len(self._own) < self.count:
            self._own.append(shared_memory.Segment(SEGMENT_BYTES, sealed=True, name="patchwire-read"))

    def after_fork_in_child(self) -> None:
        self._inherited, self._own = self._own, []

    def claim(self) -> shared_memory.Segment | None:
        """In a forked child: one of the parent's segments that no other process holds now, or None."""
        while self._inherited:
            inherited = self._inherited.pop()
            try:
                fd = os.open(f"/proc/self/fd/{inherited.fileno()}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return shared_memory.Segment.adopt(fd)
            except OSError:  # held by another child
                os.close(fd)
        return None


INHERITANCE = Inheritance()


class ReadSegments:
    """This process's segments for reading samples. A call takes one; the arrays of its payloads view the segment
    (each through an exporter that keeps the segment's mapping alive), and the segment is used again once the call
    has returned and the last of those arrays is gone. While ``lent`` segments are held by arrays (a caller keeping
    samples), further calls copy their payloads out instead (into the process's page pool), so that kept samples
    never pin more than ``lent`` segments. At most ``keep`` free segments are kept (one per thread reading at once:
    the loop and a read-ahead thread). A segment is never used again where the server may still write into it (a
    call that failed) or where a forked child may still read it (lent out when this process forked)."""

    def __init__(self, keep: int = 2, lent: int = 4) -> None:
        self._keep = keep
        self._lent_max = lent
        self._free: list[shared_memory.Segment] = []
        self._lent: dict[shared_memory.Segment, int] = {}
        self._busy: set[shared_memory.Segment] = set()
        self._retired: set[shared_memory.Segment] = set()
        # re-entrant: a garbage collection while the lock is held may release a lent array in this thread
        self._lock = threading.RLock()
        self._pid = os.getpid()

    @property
    def free(self) -> tuple[shared_memory.Segment, ...]:
        with self._lock:
            return tuple(self._free)

    @property
    def lent(self) -> int:
        """Segments that arrays still view."""
        with self._lock:
            return len(self._lent)

    def take(self) -> shared_memory.Segment:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's segments are the parent's
                self._forget()
            segment = self._free.pop() if self._free else None
            if segment is not None:
                self._busy.add(segment)
                return segment
        # sealed against resizing: the server writes through a mapping (strided arrays copied straight in)
        segment = INHERITANCE.claim() or shared_memory.Segment(SEGMENT_BYTES, sealed=True, name="patchwire-read")
        with self._lock:
            self._busy.add(segment)
        return segment

    def lend(self, segment: shared_memory.Segment, offset: int, nbytes: int) -> np.ndarray | None:
        """``nbytes`` at ``offset`` of a segment taken for a call, as a uint8 array that keeps it lent out; None where
        too many segments are lent out already (copy the bytes out instead)."""
        with self._lock:
            if segment not in self._lent and len(self._lent) >= self._lent_max:
                return None
            self._lent[segment] = self._lent.get(segment, 0) + 1
        view = segment.view(offset, nbytes)  # (maps the segment's pages in, once)
        exporter = (ctypes.c_char * nbytes).from_buffer(view.data)  # holds the mapping, even once closed
        weakref.finalize(exporter, self._released, segment).atexit = False
        return np.frombuffer(memoryview(exporter), dtype=np.uint8)

    def _released(self, segment: shared_memory.Segment) -> None:
        with self._lock:
            left = self._lent.get(segment, 1) - 1
            if left > 0:
                self._lent[segment] = left
                return
            self._lent.pop(segment, None)
            if segment in self._busy:
                return  # its call has not returned yet
        self._recycle(segment)

    def give_back(self, segment: shared_memory.Segment, ok: bool) -> None:
        """A call is over (``ok``: it succeeded; else the server may still write into its segment)."""
        with self._lock:
            self._busy.discard(segment)
            if not ok:
                self._retired.add(segment)
            if segment in self._lent:
                return  # arrays still view it
        self._recycle(segment)

    def _recycle(self, segment: shared_memory.Segment) -> None:
        """A segment no call and no array uses any more: kept for the next call, or closed."""
        with self._lock:
            retired = segment in self._retired
            self._retired.discard(segment)
            if not retired:
                segment.release_pages(KEEP_BYTES)  # a call far larger than usual leaves no lasting footprint
                if self._pid == os.getpid() and len(self._free) < self._keep:
                    self._free.append(segment)
                    return
        segment.close()

    def before_fork(self) -> None:
        """The segments lent out now are shared with the child from here on: never used again by this process."""
        with self._lock:
            self._retired |= self._lent.keys()

    def _forget(self) -> None:
        """In a forked child (under the lock): the parent's segments are the parent's; those arrays still view are
        closed here once the arrays are gone."""
        free, self._free = self._free, []
        self._retired |= self._lent.keys() | self._busy
        self._pid = os.getpid()
        for segment in free:
            segment.close()  # this process's copies only: the parent's registrations and pages are the parent's


SEGMENTS = ReadSegments()


def _before_fork() -> None:
    SEGMENTS.before_fork()
    INHERITANCE.before_fork()


def _after_fork_in_child() -> None:
    INHERITANCE.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class Target:
    """One call's segment: where the server writes its payloads; arrays view them there (or copies of them in
    ``pool``'s buffers, while too many segments are lent out)."""

    def __init__(self, segment: shared_memory.Segment, region: bytes, pool: framing.PayloadPool | None) -> None:
        self.segment = segment
        self.region = region
        self.written = 0
        """Payload bytes the server wrote into the segment for this call."""
        self._pool = pool

    def payloads(self, batch: Any, offsets: Sequence[int]) -> list[np.ndarray]:
        """The payloads of ``batch``'s chunked tensors at ``offsets`` (as the server named them; checked against the
        tensors' sizes and the segment)."""
        try:
            sizes = [tensors.announced_nbytes(t) for t in framing.batch_tensors(batch) if t.chunked_nbytes]
        except (WireError, ValueError) as exc:
            raise ProtocolError(f"the server announced a payload that cannot be right: {exc}") from None
        if len(sizes) != len(offsets):
            raise ProtocolError(f"the server gave {len(offsets)} offsets for {len(sizes)} payloads")
        out = []
        for offset, size in zip(offsets, sizes, strict=True):
            if offset < shared_memory.HEADER_BYTES or offset + size > self.segment.size:
                raise ProtocolError(f"the server named bytes {offset}..{offset + size} outside the shared segment")
            array = SEGMENTS.lend(self.segment, offset, size)
            if array is None:
                array = self._pool.take(size) if self._pool is not None else np.empty(size, dtype=np.uint8)
                np.copyto(array, self.segment.view(offset, size))
            out.append(array)
        self.written += sum(sizes)
        return out

    def finish(self, ok: bool) -> None:
        """After the call: the segment is used again once the arrays viewing it are gone; after a failed call never
        (the server may still be writing into it)."""
        SEGMENTS.give_back(self.segment, ok)


class SharedReads:
    """Whether, and into which segment, this process's GetSamples calls to ``connection``'s server are delivered
    through shared memory. ``enabled`` False: never (the wire). Found out on first use in each process."""

    def __init__(self, connection: Connection, enabled: bool = True) -> None:
        self._connection = connection
        self.enabled = enabled
        INHERITANCE.wanted |= enabled
        self._usable: bool | None = None
        self._pid = os.getpid()

    @property
    def usable(self) -> bool | None:
        """True once a segment was registered with the server in this process, False once one could not be (or
        shared memory is turned off here), None before the first try."""
        self._check_process()
        return self._usable

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked or unpickled copy: this process finds out for itself
            self._pid = os.getpid()
            self._usable = None

    def target(self) -> Target | None:
        """A registered segment for the next call, or None: read over the wire."""
        self._check_process()
        if not self.enabled or self._usable is False:
            return None
        if not shared_memory.available():
            self._usable = False
            return None
        segment = SEGMENTS.take()
        try:
            region = _shared_memory.Registrar(self._connection, _direct).register(segment, for_posting=False)
        except ConnectionFailed:  # (an OSError too: the server stayed unreachable, not unusable)
            SEGMENTS.give_back(segment, True)
            raise
        except _shared_memory.UNUSABLE as exc:
            # another host or container (no socket here), a user id not allowed, shared memory off on the server
            _log.info("samples cannot be read through shared memory (%s); reading over the wire", exc)
            SEGMENTS.give_back(segment, True)
            self._usable = False
            return None
        self._usable = True
        return Target(segment, region, self._connection.buffers)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_usable": None}
