"""Shared memory between a client and a server on the same host: payloads copied through memory instead of crossing
gRPC, with descriptors handed over explicitly, never named by a path.

A client makes a *segment* with ``memfd_create`` and *registers* it: a RegisterSharedMemory call returns the path of
the server's Unix socket and a one-time ticket, and the client sends the ticket over that socket with the segment's
descriptor attached (``SCM_RIGHTS``). The server checks the peer's credentials (``SO_PEERCRED``), the ticket, that
the descriptor is a memfd (sealed against shrinking, for posting) of a bounded size, and answers with a random
*region* id, which messages then carry (``SharedMemory.region``). The region belongs to the identity that asked for
the ticket and lives as long as the socket connection it came over (or until the client unregisters it). So the
server only ever uses descriptors a client handed it; it opens no path a request names.

The server then only copies element bytes: out of a region through a read-only mapping (posting; only from a segment
sealed against shrinking, so that the mapping can never lose its pages under the server), or into it (fetching
subjects and samples): through a writable mapping where the segment is sealed against shrinking, else with
``pwrite`` (a segment shrunk meanwhile turns into an error, never a crash). Nothing in a segment is ever interpreted
beyond the byte ranges the messages name.

The other way round, the server offers descriptors of its own (``SharedFile.lease``): result files that never change
(opened read-only by the server itself), and, for volumes it keeps in memory, read-only descriptors of its memfds
(sealed against resizing and against any new writable shared mapping). A client collects each over the connection of
the region its request named (a lease offered for one connection cannot be collected over another) and maps it
privately (:func:`map_descriptor`); leases of the server's memory are given back once the mapping is gone, before
the server may reuse that memory.

The socket speaks ``SOCK_SEQPACKET``. On connecting, the server greets with ``b"O"``, or ``b"E" + reason`` (e.g. a
user id it does not allow) and closes. Then each request gets one reply, each a kind byte and its data::

    REGISTER   b"R" + ticket, one descriptor attached   ->  b"O" + region id   | b"E" + reason
    UNREGISTER b"U" + region id                         ->  b"O"               | b"E" + reason
    COLLECT    b"C" + lease                             ->  b"O", descriptor   | b"E" + reason

Where ``memfd_create`` is missing (not Linux), :func:`available` is False and clients use the wire.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import select
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ALIGN",
    "HEADER_BYTES",
    "Channel",
    "ChannelError",
    "OpenedSegment",
    "Segment",
    "SegmentError",
    "available",
    "layout",
    "map_descriptor",
]

HEADER_BYTES = 4096
"""The first page of a segment is left unused; payloads start after it."""
ALIGN = 64
"""Payload offsets are multiples of this (numpy and SIMD copies like aligned data)."""
REGION_ID_BYTES = 32
TICKET_BYTES = 32
LEASE_MAX_BYTES = 64
MESSAGE_MAX_BYTES = 1024
"""No request or reply on the socket is longer."""
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)
REGISTER, UNREGISTER, COLLECT = b"R", b"U", b"C"
OK, ERROR = b"O", b"E"
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)


def _libc_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _libc_madvise()


def _populate(mapping: mmap.mmap, advice: int, start: int, end: int) -> None:
    """Maps the pages of ``[start, end)`` of ``mapping`` in one call (Linux >= 5.14), allocating them where they are
    new: far cheaper than one fault per page on the virtual machines measured (a no-op where unsupported). Called
    through ctypes, which lets go of the GIL (``mmap.madvise`` holds it, and allocating tens of MB of pages took a
    server's event loop away for milliseconds)."""
    start -= start % mmap.PAGESIZE
    end = min(len(mapping), end)
    if end <= start or _MADVISE is None:
        return
    try:
        anchor = ctypes.c_char.from_buffer(mapping)  # (exported only to read the address)
    except (TypeError, ValueError):  # a read-only mapping
        anchor = None
    if anchor is None:
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(advice, start, end - start)
        return
    address = ctypes.addressof(anchor)
    del anchor
    _MADVISE(address + start, end - start, advice)  # (a failure, e.g. an older kernel, only costs the faults)


class SegmentError(Exception):
    """A segment cannot be used; the message says why (for the status a server returns, or a client's log)."""


class ChannelError(SegmentError):
    """The server refused a request on its shared-memory socket; the message is its reason."""


def available() -> bool:
    """Whether this process can make segments and hand them over (Linux with ``memfd_create`` and ``SCM_RIGHTS``)."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def layout(sizes: Sequence[int], start: int = HEADER_BYTES) -> tuple[list[int], int]:
    """Offsets for payloads of ``sizes`` bytes laid out one after another from ``start``, each aligned to ALIGN;
    and the end of the last one."""
    offsets = []
    end = start
    for size in sizes:
        end = -(-end // ALIGN) * ALIGN
        offsets.append(end)
        end += size
    return offsets, end


def seal_size(fd: int) -> None:
    """Fixes a memfd's size for good (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL): no process that holds it can take
    pages away from under another's mapping (where writing or reading would raise SIGBUS)."""
    fcntl.fcntl(fd, _ADD_SEALS, _SEAL_SHRINK | _SEAL_GROW | _SEAL_SEAL)


def seal_for_lending(fd: int) -> None:
    """Seals a memfd of the server's that is already mapped writable: its size is fixed and no new writable shared
    mapping of it, nor any ``write``, is possible any more (F_SEAL_FUTURE_WRITE), whoever holds it; the existing
    mapping keeps writing. A client that gets it can only map it privately. Raises OSError where the kernel lacks
    F_SEAL_FUTURE_WRITE (Linux < 5.1)."""
    fcntl.fcntl(fd, _ADD_SEALS, _SEAL_SHRINK | _SEAL_GROW | _SEAL_FUTURE_WRITE | _SEAL_SEAL)


def seals(fd: int) -> int:
    """A descriptor's seals; OSError where it is not a file that supports them (a memfd or other shmem file)."""
    return int(fcntl.fcntl(fd, _GET_SEALS))


def reopen_read_only(fd: int) -> int:
    """A new read-only descriptor of one of this process's own files (opened anew, not duplicated: a duplicate
    would carry the original's write access)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class Segment:
    """A client's segment of ``HEADER_BYTES + nbytes`` bytes, mapped read-write. ``sealed``: its size is fixed for
    good (F_SEAL_SHRINK and F_SEAL_GROW), as posting requires; unsealed segments may be sparse and huge, pages are
    only used where something is written. The descriptor stays open until :meth:`close`; the segment remembers the
    regions it is registered as (one per :class:`Channel`) and unregisters them when it closes."""

    def __init__(self, nbytes: int, sealed: bool, name: str = "patchwire") -> None:
        self.size = HEADER_BYTES + nbytes
        self.sealed = sealed
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, self.size)
            if sealed:
                seal_size(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._map: mmap.mmap | None = None
        self._mapped_bytes = 0
        self._regions: list[tuple[Channel, bytes]] = []

    @classmethod
    def adopt(cls, fd: int) -> Segment:
        """A segment over a memfd descriptor this process already holds (e.g. opened anew from an inherited one):
        the segment owns ``fd`` from now on."""
        segment = cls.__new__(cls)
        segment._fd = fd
        segment.size = os.fstat(fd).st_size
        segment.sealed = bool(seals(fd) & _SEAL_SHRINK)
        segment._map = None
        segment._mapped_bytes = 0
        segment._regions = []
        return segment

    def fileno(self) -> int:
        return self._fd

    @property
    def touched_bytes(self) -> int:
        """How far into the segment this process's views have reached (where its pages may be)."""
        return self._mapped_bytes

    def release_pages(self, start: int) -> None:
        """Gives the pages from ``start`` on back to the system (``MADV_REMOVE``: they read as zeros afterwards);
        only while no array views them."""
        if self._map is not None and self._mapped_bytes > start:
            start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(_MADV_REMOVE, start, self._mapped_bytes - start)
            self._mapped_bytes = start

    def region_on(self, channel: Channel) -> bytes | None:
        """The region this segment is registered as over ``channel``, if it is and the channel is still usable."""
        for known, region in self._regions:
            if known is channel:
                return region if channel.usable() else None
        return None

    def register(self, channel: Channel, ticket: bytes) -> bytes:
        """Registers the segment over ``channel`` with a ticket of the server's; returns the region id."""
        region = channel.register(ticket, self._fd)
        self._regions = [(c, r) for c, r in self._regions if c.usable()]
        self._regions.append((channel, region))
        return region

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes at ``offset`` as a writable uint8 array (of one mapping of the whole segment, kept: its
        pages are mapped in once, in bulk, the first time a view reaches them)."""
        if self._map is None:
            self._map = self.map(self.size)
        if offset + nbytes > self._mapped_bytes:
            _populate(self._map, _MADV_POPULATE_READ, max(offset, self._mapped_bytes), offset + nbytes)
            self._mapped_bytes = offset + nbytes
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=offset)

    def map(self, length: int) -> mmap.mmap:
        """A new read-write mapping of the segment's first ``length`` bytes."""
        if self._fd < 0:
            raise ValueError("the segment is closed")
        return mmap.mmap(self._fd, length)

    def close(self) -> None:
        """Unregisters the segment (where this process made the registration) and closes the descriptor (arrays
        viewing the segment stay valid: the mapping lives as long as they do)."""
        regions, self._regions = self._regions, []
        for channel, region in regions:
            channel.unregister_soon(region)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._map = None


class Channel:
    """A client's connection to a server's shared-memory socket (see the module docstring): registers segments and
    collects the descriptors the server offers. Requests are made one at a time (thread-safe). A channel belongs to
    the process that opened it: a forked child must open its own (:meth:`usable` is False there)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._sock.recv(MESSAGE_MAX_BYTES)
            if greeting[:1] != OK:
                reason = greeting[1:].decode("utf-8", "replace") or "the server closed the connection"
                raise ChannelError(reason)
        except BaseException:
            self._sock.close()
            raise
        self._broken = False
        self._unregister: list[bytes] = []

    def usable(self) -> bool:
        """Open, made by this process, and not closed by the server (e.g. a server that restarted)."""
        if self._broken or self.pid != os.getpid():
            return False
        with self._lock:
            if self._sock.fileno() < 0:
                return False
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            if poller.poll(0):  # nothing is ever sent unasked: readable means closed (or refused at connect)
                self._broken = True
        return not self._broken

    def unregister_soon(self, region: bytes) -> None:
        """Unregisters a region now, or with the next request where a request is in progress (e.g. a segment closed
        by a finalizer that runs in the middle of one). Best effort: a broken channel's regions are gone anyway."""
        if self._broken or self.pid != os.getpid():
            return
        self._unregister.append(region)
        if self._lock.acquire(blocking=False):
            try:
                self._flush_unregister()
            except OSError:
                self._broken = True
            finally:
                self._lock.release()

    def _flush_unregister(self) -> None:
        while self._unregister:
            self._sock.sendall(UNREGISTER + self._unregister.pop())
            data, received, _, _ = socket.recv_fds(self._sock, MESSAGE_MAX_BYTES, 1)
            for fd in received:
                os.close(fd)
            if not data:
                raise ConnectionResetError("the server closed its shared-memory socket")

    def _request(self, message: bytes, fds: Sequence[int] = (), want_fd: bool = False) -> tuple[bytes, int | None]:
        with self._lock:
            try:
                self._flush_unregister()
                if fds:
                    socket.send_fds(self._sock, [message], list(fds))
                else:
                    self._sock.sendall(message)
                data, received, _, _ = socket.recv_fds(self._sock, MESSAGE_MAX_BYTES, 1)
            except OSError:
                self._broken = True
                raise
        fd = received[0] if received else None
        if not data:
            self._broken = True
            if fd is not None:
                os.close(fd)
            raise ConnectionResetError("the server closed its shared-memory socket")
        if data[:1] == ERROR or not want_fd or fd is None:
            if fd is not None:
                os.close(fd)
                fd = None
            if data[:1] != OK:
                raise ChannelError(data[1:].decode("utf-8", "replace") or "refused")
            if want_fd:
                raise ChannelError("the server sent no descriptor")
        return data[1:], fd

    def register(self, ticket: bytes, fd: int) -> bytes:
        region, _ = self._request(REGISTER + ticket, [fd])
        if len(region) != REGION_ID_BYTES:
            raise ChannelError("the server answered a registration with no region id")
        return region

    def unregister(self, region: bytes) -> None:
        self._request(UNREGISTER + region)

    def collect(self, lease: bytes) -> int:
        """The descriptor the server offered under ``lease`` (the caller closes it)."""
        _, fd = self._request(COLLECT + lease, want_fd=True)
        assert fd is not None
        return fd

    def close_copy(self) -> None:
        """In a forked child: closes this process's copy of the parent's connection (which stays open in the parent;
        the lock is not taken: another thread of the parent may have held it at the fork)."""
        self._broken = True
        self._sock.close()

    def close(self) -> None:
        """Closes the connection: the server drops every region registered over it."""
        self._broken = True
        with self._lock:
            self._sock.close()


class OpenedSegment:
    """A client's segment as the server holds it (a registered region): mapped read-only for posting; for fetching,
    written through a writable mapping where the segment's size is sealed (``writable_map``: nothing can take pages
    away under it, and strided arrays are copied straight in), else with ``pwrite``. :meth:`close` waits for a write
    in progress: the descriptor is never closed under it."""

    def __init__(self, fd: int, size: int, readable_map: bool, writable_map: bool = False) -> None:
        self._fd = fd
        self.size = size
        self._lock = threading.Lock()
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ) if readable_map and size else None
        self._writable = writable_map
        self._write_map: mmap.mmap | None = None
        self._written_bytes = 0

    def _check(self, offset: int, nbytes: int, size: int, what: str) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise SegmentError(f"{what}: bytes {offset}..{offset + nbytes} lie outside the {size}-byte segment")

    def current_size(self) -> int:
        """The segment's size now (an unsealed segment may have been resized since it was registered)."""
        with self._lock:
            if self._fd < 0:
                raise SegmentError("the region was unregistered")
            return os.fstat(self._fd).st_size

    def read(self, offset: int, nbytes: int, what: str = "offset") -> memoryview:
        """A read-only view of ``nbytes`` bytes at ``offset`` (valid as long as the view lives)."""
        self._check(offset, nbytes, self.size, what)
        mapping = self._map
        try:
            if mapping is None:
                raise ValueError
            return memoryview(mapping)[offset : offset + nbytes]
        except ValueError:  # (closed meanwhile: a mapping with views is never closed under them)
            raise SegmentError("the region was unregistered") from None

    def _mapped(self, end: int) -> mmap.mmap | None:
        """A writable mapping of at least the first ``end`` bytes (under the lock): kept, and made anew, twice as
        large, when a write reaches past it (the address space of a nominally huge segment is taken as it is used);
        None where the segment cannot be mapped writable (then ``pwrite``)."""
        mapping = self._write_map
        if mapping is not None and len(mapping) >= end:
            return mapping
        length = min(self.size, max(end, 2 * (len(mapping) if mapping is not None else 0), 64 << 20))
        try:
            new = mmap.mmap(self._fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):  # e.g. sealed against writing meanwhile
            self._writable = False
            return None
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()
        self._write_map = new
        self._written_bytes = 0  # (a new mapping: its pages are mapped in anew)
        return new

    def write(self, offset: int, parts: Sequence[memoryview | np.ndarray]) -> None:
        """Writes ``parts`` (bytes, or arrays of any strides, copied as C-order elements) one after another from
        ``offset``."""
        with self._lock:
            if self._fd < 0:
                raise SegmentError("the region was unregistered")
            pieces = [p if isinstance(p, np.ndarray) else memoryview(p).cast("B") for p in parts]
            total = sum(p.nbytes for p in pieces)
            if self._writable:
                self._check(offset, total, self.size, "offset")  # (sealed: the size never changes)
                mapping = self._mapped(offset + total)
                if mapping is not None:
                    if offset + total > self._written_bytes:
                        start = max(offset, self._written_bytes)
                        _populate(mapping, _MADV_POPULATE_WRITE, start, offset + total)
                        self._written_bytes = offset + total
                    for piece in pieces:
                        if isinstance(piece, np.ndarray):
                            target = np.frombuffer(mapping, dtype=piece.dtype, count=piece.size, offset=offset)
                            np.copyto(target.reshape(piece.shape), piece, casting="no")
                            del target
                        else:
                            mapping[offset : offset + piece.nbytes] = piece
                        offset += piece.nbytes
                    return
            self._check(offset, total, os.fstat(self._fd).st_size, "offset")
            for piece in pieces:
                view = (
                    np.ascontiguousarray(piece).reshape(-1).data.cast("B") if isinstance(piece, np.ndarray) else piece
                )
                while len(view):
                    try:
                        written = os.pwrite(self._fd, view, offset)
                    except OSError as exc:  # e.g. sealed against writing by its client
                        raise SegmentError(f"the segment cannot be written: {exc.strerror}") from None
                    if written <= 0:
                        raise SegmentError("the segment shrank while it was being written")
                    view = view[written:]
                    offset += written

    def close(self) -> None:
        with self._lock:
            if self._write_map is not None:
                with contextlib.suppress(BufferError):
                    self._write_map.close()
                self._write_map = None
            if self._map is not None:
                with contextlib.suppress(BufferError):  # views still exported: the mapping goes with the last of them
                    self._map.close()
                self._map = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def map_descriptor(fd: int, offset: int, nbytes: int) -> np.ndarray | None:
    """``nbytes`` of a file the server handed over, from ``offset``, as a writable uint8 array of a private mapping
    (writes stay in this process); None where the file is too short. The descriptor may be closed afterwards."""
    size = os.fstat(fd).st_size
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        return None
    mapping = mmap.mmap(fd, offset + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset)


def mapping_of(array: np.ndarray) -> mmap.mmap:
    """The mapping under an array of :func:`map_descriptor` (it lives as long as any array viewing it)."""
    base: Any = array
    while not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base
