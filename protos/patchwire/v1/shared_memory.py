"""Shared-memory segments: payloads between a client and a server on the same host, copied through memory instead
of crossing gRPC.

A client makes a segment with ``memfd_create``, writes a random token at its start and names it by the path under
which another process can open it, ``/proc/<pid>/fd/<fd>``. The server opens it by that path, which works only on
the same host (the same ``/proc``) and for a process allowed to read the client's descriptors (the same user), and
reads the token back: proof that it opened the segment the client meant. The server accepts nothing but a name of
exactly that form that opens a memfd, and then only copies element bytes: out of the segment through a read-only
mapping (posting; only from a segment sealed against shrinking, so that the mapping can never lose its pages under
the server), or into it with ``pwrite`` (fetching; a segment shrunk meanwhile turns into an error, never a crash).
Nothing in a segment is ever interpreted beyond the byte ranges the messages name.

The other way round, a server names files of its own for a client to map privately (:func:`map_file`): result files
that never change, and, for volumes it keeps in memory, its own memfds (sealed against shrinking and growing), lent
under a lease that the client gives back once its mapping is gone, before the server may reuse that memory.

Where ``memfd_create`` is missing (not Linux), :func:`available` is False and clients use the wire.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from patchwire.v1 import assembly_service_pb2 as apb

__all__ = [
    "ALIGN",
    "HEADER_BYTES",
    "OpenedSegment",
    "Segment",
    "SegmentError",
    "available",
    "layout",
    "map_file",
    "open_segment",
]

HEADER_BYTES = 4096
"""The first page holds the token; payloads start after it."""
ALIGN = 64
"""Payload offsets are multiples of this (numpy and SIMD copies like aligned data)."""
TOKEN_BYTES = 32
_PATH = re.compile(r"^/proc/[1-9][0-9]{0,9}/fd/[0-9]{1,10}$")
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)


class SegmentError(Exception):
    """A segment cannot be used; the message says why (for the status a server returns, or a client's log)."""


def available() -> bool:
    """Whether this process can make segments (Linux with ``memfd_create``)."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


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
    """Fixes a memfd's size for good (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL): no process that can open it can
    take pages away from under another's mapping (where writing or reading would raise SIGBUS)."""
    fcntl.fcntl(fd, _ADD_SEALS, _SEAL_SHRINK | _SEAL_GROW | _SEAL_SEAL)


class Segment:
    """A client's segment of ``HEADER_BYTES + nbytes`` bytes, mapped read-write. ``sealed``: its size is fixed for
    good (F_SEAL_SHRINK and F_SEAL_GROW), as posting requires; unsealed segments may be sparse and huge, pages are
    only used where something is written. The descriptor stays open until :meth:`close`: the server opens the
    segment through it."""

    def __init__(self, nbytes: int, sealed: bool, name: str = "patchwire") -> None:
        self.size = HEADER_BYTES + nbytes
        self.token = os.urandom(TOKEN_BYTES)
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, self.size)
            os.pwrite(self._fd, self.token, 0)
            if sealed:
                seal_size(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self._map: mmap.mmap | None = None

    def proto(self) -> apb.SharedMemory:
        return apb.SharedMemory(path=self.path, token=self.token)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` bytes at ``offset`` as a writable uint8 array (of one mapping of the whole segment)."""
        if self._map is None:
            self._map = self.map(self.size)
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=offset)

    def map(self, length: int) -> mmap.mmap:
        """A new read-write mapping of the segment's first ``length`` bytes."""
        if self._fd < 0:
            raise ValueError("the segment is closed")
        return mmap.mmap(self._fd, length)

    def close(self) -> None:
        """Closes the descriptor (arrays viewing the segment stay valid: the mapping lives as long as they do)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._map = None


class OpenedSegment:
    """A client's segment as the server opened it (see :func:`open_segment`)."""

    def __init__(self, fd: int, size: int, readable_map: bool) -> None:
        self._fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ) if readable_map and size else None

    def _check(self, offset: int, nbytes: int, what: str) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise SegmentError(f"{what}: bytes {offset}..{offset + nbytes} lie outside the {self.size}-byte segment")

    def read(self, offset: int, nbytes: int, what: str = "offset") -> memoryview:
        """A read-only view of ``nbytes`` bytes at ``offset``."""
        self._check(offset, nbytes, what)
        assert self._map is not None, "opened for writing"
        return memoryview(self._map)[offset : offset + nbytes]

    def write(self, offset: int, parts: Sequence[memoryview]) -> None:
        """Writes ``parts`` one after another from ``offset``."""
        self._check(offset, sum(len(p) for p in parts), "offset")
        for part in parts:
            view = memoryview(part).cast("B")
            while len(view):
                written = os.pwrite(self._fd, view, offset)
                if written <= 0:
                    raise SegmentError("the segment shrank while it was being written")
                view = view[written:]
                offset += written

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still exported: the mapping goes with the last of them
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def map_file(ref: apb.SharedFile, nbytes: int) -> np.ndarray | None:
    """``nbytes`` of a server's file from ``ref.offset`` as a writable uint8 array of a private mapping (writes stay
    in this process); None where the file cannot be opened here or is not the one the server meant."""
    try:
        fd = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (ref.device, ref.inode) or ref.offset < 0 or ref.offset + nbytes > st.st_size:
            return None
        mapping = mmap.mmap(fd, ref.offset + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=ref.offset)


def mapping_of(array: np.ndarray) -> mmap.mmap:
    """The mapping under an array of :func:`map_file` (it lives as long as any array viewing it)."""
    base: Any = array
    while not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base


def open_segment(ref: apb.SharedMemory, for_posting: bool) -> OpenedSegment:
    """Opens a client's segment: read-only and mapped for posting (it must be sealed against shrinking), read-write
    for fetching. Raises SegmentError with the reason when it cannot be used."""
    if not available():
        raise SegmentError("this server cannot use shared memory (it needs Linux with memfd_create)")
    if not _PATH.match(ref.path):
        raise SegmentError(f"path: {ref.path!r} is not a segment name of the form /proc/<pid>/fd/<fd>")
    if not 16 <= len(ref.token) <= 64:
        raise SegmentError(f"token: must be 16 to 64 bytes, got {len(ref.token)}")
    try:
        fd = os.open(ref.path, (os.O_RDONLY if for_posting else os.O_RDWR) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(
            f"path: {ref.path} does not exist here: the client runs on another host, in another process namespace "
            "(a container), or has closed the segment"
        ) from None
    except PermissionError:
        raise SegmentError(
            f"path: no permission to open {ref.path}: the server runs as another user than the client"
        ) from None
    except OSError as exc:
        raise SegmentError(f"path: cannot open {ref.path}: {exc.strerror}") from None
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
            raise SegmentError(f"path: {ref.path} is not a memfd segment")
        seals = fcntl.fcntl(fd, _GET_SEALS)
        if for_posting and not seals & _SEAL_SHRINK:
            raise SegmentError("the segment is not sealed against shrinking (F_SEAL_SHRINK): it cannot be posted from")
        size = os.fstat(fd).st_size
        if os.pread(fd, len(ref.token), 0) != ref.token:
            raise SegmentError(f"token: {ref.path} does not begin with the token: it is not the client's segment")
        return OpenedSegment(fd, size, readable_map=for_posting)
    except BaseException:
        os.close(fd)
        raise
