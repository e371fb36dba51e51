"""The memory under partial volumes: a pool that keeps at most a budget of it resident, spills the rest to files,
keeps spare memory for reuse and lends kept volumes to same-host clients under leases.

Partial volumes live in anonymous memory (transparent huge pages where the kernel offers them); the
:class:`MemoryPool` keeps at most ``budget`` bytes of them in memory and spills the least recently used to files
(read back when their subject gets predictions again), so resident memory stays near the budget however many
subjects are in flight. A single subject larger than the budget is held alone. Volumes a store without a state
folder keeps (``overwrite``) are assembled in memfds where the server shares memory, so that a client on its host
maps a finished volume instead of receiving a copy; such memory is reused only once every client that mapped it has
given its lease back.

Locks: :attr:`MemoryPool.lock` is taken after a job's lock (never the other way round) and before the memfd count's
lock (``_memfds_lock``), which is reentrant because a garbage collection inside any locked block may close a memfd.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import resource
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from patchwire.wire import shared_memory

if TYPE_CHECKING:
    from patchwire.service.assembly.subjects import Subject

__all__ = ["SHARED_VOLUME_MIN_BYTES", "Memory", "MemoryPool"]

_log = logging.getLogger(__name__)
SHARED_VOLUME_MIN_BYTES = 4 << 20
"""Kept volumes at least this large are assembled in memory that a client on the server's host can map (a memfd):
fetching them copies nothing. Smaller ones are copied to the client (cheap; and each memfd holds two descriptors)."""


class Memory(mmap.mmap):
    """The memory under a buffer: anonymous (``fd`` None), or a memfd that a client on the server's host can map
    (a read-only descriptor of it is handed over, see :func:`results.lend_volume`); ``leases``: the leases of it that
    clients hold (:meth:`MemoryPool.lend`)."""

    fd: int | None = None
    leases: set[bytes]


class MemoryPool:
    """Keeps at most ``budget`` bytes of partial-volume buffers in memory; spills the least recently used to files.

    The memory of buffers dropped while no array views them any more is kept for later subjects' buffers, within the
    same budget (spare memory goes first when buffers need the room): writing into pages the process already has is
    several times cheaper than into fresh ones on the machines measured, where first touches also varied 2-4x.

    With ``share``, kept volumes (:attr:`Job.keeps_volumes`) of at least ``SHARED_VOLUME_MIN_BYTES`` live in memfds
    that a same-host client maps when it fetches them, under a lease (:meth:`lend`). Memory a client holds a lease of
    is never reused: dropped, it is held (within the budget, least recently dropped given up first) until its leases
    come back (:meth:`give_back`), and given up otherwise, its pages then living on in the clients' mappings."""

    def __init__(self, budget: int, share: bool = False) -> None:
        self.budget = budget
        self.share = share and hasattr(os, "memfd_create")
        self.memfds = 0
        """Memfds open (each holds two descriptors: at most :attr:`memfds_max` of them)."""
        self.memfds_max = _descriptor_limit() // 4
        """Most memfds open at once: a quarter of the process's descriptor limit; further kept volumes are assembled
        in anonymous memory, which a fetch copies."""
        self._memfds_lock = threading.RLock()  # after ``lock``; reentered: a collection inside it may free a memfd
        self._open: OrderedDict[int, tuple[Subject, int]] = OrderedDict()
        self.lock = threading.Lock()
        """Guards the pool and every subject's buffers and memory (taken after a job's lock, before the memfds')."""
        self.resident = 0
        """Bytes of the buffers in memory now."""
        self._spare: list[Memory] = []
        self.spare_bytes = 0
        """Bytes of memory kept for later buffers."""
        self._held: list[Memory] = []
        self.held_bytes = 0
        """Bytes of dropped memory held for the leases clients still hold of it."""
        self._leases: dict[bytes, Memory] = {}

    @property
    def spare_shared_bytes(self) -> int:
        """Bytes of spare memory in memfds (a later kept volume can be lent from them)."""
        with self.lock:
            return sum(len(m) for m in self._spare if m.fd is not None)

    @property
    def leases(self) -> frozenset[bytes]:
        """The leases clients hold now."""
        with self.lock:
            return frozenset(self._leases)

    def zeros(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], zero: bool = True, shareable: bool = False
    ) -> tuple[np.ndarray, Memory]:
        """A buffer and the memory under it: spare memory of about its size, or new (call under the lock). Spare
        memory holds what an earlier buffer left: it is zeroed unless ``zero`` is False (the caller overwrites every
        byte before anything reads it). ``shareable``: a kept volume, for a memfd where the pool shares them."""
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        shareable = shareable and self.share and nbytes >= SHARED_VOLUME_MIN_BYTES
        fits = [
            m for m in self._spare if nbytes <= len(m) <= nbytes + nbytes // 4 and (m.fd is not None or not shareable)
        ]
        if fits:
            memory = min(fits, key=lambda m: (len(m), m.fd is not None))
            self._spare.remove(memory)
            self.spare_bytes -= len(memory)
            if zero:
                np.frombuffer(memory, dtype=np.uint8, count=nbytes)[:] = 0
        elif shareable and self.memfds < self.memfds_max:
            memory = _shareable(nbytes, self._memfd_closed)
            with self._memfds_lock:
                self.memfds += memory.fd is not None
        else:
            memory = _anonymous(nbytes)
        return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape), memory

    def _memfd_closed(self) -> None:
        with self._memfds_lock:
            self.memfds -= 1

    def _recycle(self, memories: list[Memory]) -> None:
        """Keeps the memory of dropped buffers that nothing views any more, as far as the budget allows; holds
        memory that clients hold leases of."""
        while memories:
            memory = memories.pop()
            if memory.leases:
                if self.resident + self.spare_bytes + self.held_bytes + len(memory) <= self.budget:
                    self._held.append(memory)
                    self.held_bytes += len(memory)
                else:
                    self._give_up(memory)
            # referenced here and by the call's argument only: no array is left on it
            elif (
                sys.getrefcount(memory) == 2
                and self.resident + self.spare_bytes + self.held_bytes + len(memory) <= self.budget
            ):
                self._spare.append(memory)
                self.spare_bytes += len(memory)

    def _give_up(self, memory: Memory) -> None:
        """Forgets leased memory: its leases come back to nothing, and it is freed with the last mapping of it."""
        for token in memory.leases:
            self._leases.pop(token, None)
        memory.leases = set()

    def _make_room(self, need: int) -> None:
        while (self._spare or self._held) and self.resident + self.spare_bytes + self.held_bytes + need > self.budget:
            if self._spare:
                self.spare_bytes -= len(self._spare.pop(0))
            else:
                held = self._held.pop(0)
                self.held_bytes -= len(held)
                self._give_up(held)

    def lend(self, memory: Memory) -> bytes:
        """A new lease of ``memory`` for a client that maps it (call under the lock)."""
        token = os.urandom(16)
        memory.leases.add(token)
        self._leases[token] = memory
        return token

    def give_back(self, tokens: Iterable[bytes]) -> int:
        """Ends leases (unknown ones are ignored); memory held for them alone becomes spare. Returns how many were
        outstanding."""
        released = 0
        freed: list[Memory] = []
        with self.lock:
            for token in tokens:
                memory = self._leases.pop(token, None)
                if memory is None:
                    continue
                released += 1
                memory.leases.discard(token)
                if not memory.leases and any(m is memory for m in self._held):
                    self._held.remove(memory)
                    self.held_bytes -= len(memory)
                    freed.append(memory)
            memory = None  # (the loop's reference: the recycling below counts what views each memory)
            self._recycle(freed)
        return released

    def buffers(self, subject: Subject) -> dict[str, np.ndarray]:
        """The subject's buffers, for reading (see :meth:`writing`)."""
        with self.lock:
            return self._buffers(subject)

    @contextlib.contextmanager
    def writing(self, subject: Subject) -> Iterator[dict[str, np.ndarray]]:
        """The subject's buffers, kept in memory until the block ends: a spill meanwhile (for another job's subject,
        from another thread) would lose what is written after it."""
        with self.lock:
            buffers = self._buffers(subject)
            subject.writers += 1
        try:
            yield buffers
        finally:
            with self.lock:
                subject.writers -= 1

    def _buffers(self, subject: Subject) -> dict[str, np.ndarray]:
        key = id(subject)
        if key in self._open:
            self._open.move_to_end(key)
            assert subject.mapped is not None
            return subject.mapped
        need = subject.buffer_bytes()
        self._make_room(need)
        for old_key, (old, nbytes) in list(self._open.items()):  # least recently used first
            if self.resident + need <= self.budget:
                break
            if not old.writers:
                del self._open[old_key]
                self.resident -= nbytes
                self._recycle(old.unmap())
        self._make_room(need)
        mapped = subject.map(self.zeros)
        self._open[key] = (subject, need)
        self.resident += need
        return mapped

    def release(self, subject: Subject, spill: bool) -> None:
        """Drops a subject's buffers from memory, first writing them to their files with ``spill``."""
        with self.lock:
            item = self._open.pop(id(subject), None)
            if item is not None:
                self.resident -= item[1]
                self._recycle(subject.unmap(spill))

    def resident_of(self, subjects: Sequence[Subject]) -> int:
        """Bytes of these subjects' buffers in memory now."""
        with self.lock:
            ids = {id(s) for s in subjects}
            return sum(n for key, (_, n) in self._open.items() if key in ids)


def _anonymous(nbytes: int) -> Memory:
    """Zeroed memory of its own, returned to the system once nothing references it. Huge pages (where the kernel
    offers them for the asking) make a first write into a buffer several times cheaper than 4 KiB pages, and far
    cheaper than into a memory-mapped file on disk, whose fresh pages are faulted in one by one: a 64^3 patch is
    thousands of rows of a few hundred bytes, each in another page."""
    memory = Memory(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.leases = set()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def _shareable(nbytes: int, closed: Callable[[], None]) -> Memory:
    """Zeroed memory in a memfd of its own, which a client on this host can map; the memfd is closed with the memory
    (then ``closed`` is called). Anonymous memory where no memfd can be made."""
    try:
        fd = os.memfd_create("patchwire-volume", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        _log.warning("assembling in anonymous memory, which fetching copies: no memfd (%s)", exc)
        return _anonymous(nbytes)
    try:
        os.ftruncate(fd, nbytes)
        memory = Memory(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    try:
        # its size is fixed for good, and only this mapping writes it: a client it is lent to can map it privately,
        # never shrink it under the server's writes nor write into it (whatever it reopens it as)
        shared_memory.seal_for_lending(fd)
    except OSError as exc:
        memory.close()
        os.close(fd)
        _log.warning("assembling in anonymous memory, which fetching copies: memfds cannot be sealed (%s)", exc)
        return _anonymous(nbytes)
    memory.fd = fd
    memory.leases = set()
    weakref.finalize(memory, _close_memfd, fd, closed)
    return memory


def _close_memfd(fd: int, closed: Callable[[], None]) -> None:
    os.close(fd)
    closed()


def _descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft
