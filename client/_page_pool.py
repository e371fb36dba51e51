"""The client's pool of payload buffers: pages recycled across messages, calls and sizes (Linux), so that large
batches do not wait for page faults. Client-only: a server never imports it (and never registers its fork hook)."""

from __future__ import annotations

import ctypes
import os
import threading
import weakref

import numpy as np

from patchwire.client import _pages

__all__ = ["PROCESS_BUFFERS", "PagePool", "ProcessBuffers", "process_pool"]

Run = list[_pages.Segment]
"""Pieces that lie back to back in memory: a buffer's pages, or a part of them."""


def _run_bytes(run: Run) -> int:
    return sum(length for _, length in run)


def _split_run(run: Run, nbytes: int) -> tuple[Run, Run]:
    """The first ``nbytes`` of a run and the rest (a piece across the boundary is cut in two)."""
    head: Run = []
    for k, (address, length) in enumerate(run):
        if nbytes >= length:
            head.append((address, length))
            nbytes -= length
            continue
        if nbytes:
            head.append((address, nbytes))
        return head, [(address + nbytes, length - nbytes), *run[k + 1 :]]
    return head, []


class PagePool:
    """Recycles the pages of payload buffers across messages, calls and sizes: a buffer's pages come back once every
    array viewing it is gone, and any later buffer may reuse them.

    A fresh multi-MiB buffer costs a page fault per page on first touch: patch batches (38 MB each) spent about 10%
    of the client's CPU zeroing pages, and the first batch of a stream whose batches are larger than any before (64^3
    patches after slices) took 65-95 ms to touch. Buffers of at least :attr:`MIN_BYTES` are private memory mappings
    (Linux; elsewhere plain numpy buffers). A free buffer at least as large as the one asked for is reused in place
    (the smallest such, its rest stays free); otherwise free buffers are moved into one new range (``mremap``: the
    pages move, nothing is copied or faulted), so batches of slices leave pages that a batch of patches reuses. Each
    buffer is exported through its own small ctypes array, which every numpy view (and torch tensor, through numpy)
    keeps alive through its base: its pages return only when the last view is gone, and buffers the caller keeps are
    never reused. At most ``max_bytes`` of free pages are kept; the rest are unmapped. :func:`process_pool` is the
    process's pool."""

    #: Smaller buffers come from numpy's allocator, which recycles them well.
    MIN_BYTES = 1 << 20
    #: Free runs smaller than this are unmapped rather than kept.
    MIN_PIECE = 64 << 10

    def __init__(self, max_bytes: int = 128 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: list[Run] = []
        self._free_bytes = 0
        # re-entrant: a garbage collection while the lock is held may free a buffer in this thread
        self._lock = threading.RLock()
        #: Buffers made (at least partly) of recycled pages, and how many of their bytes were.
        self.recycled = 0
        self.recycled_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (contents undefined)."""
        if nbytes < self.MIN_BYTES or not _pages.available():
            return np.empty(nbytes, dtype=np.uint8)
        length = -(-nbytes // _pages.PAGE) * _pages.PAGE
        with self._lock:
            in_place, parts, dropped = self._claim(length)
        for run in dropped:
            for piece in run:
                _pages.unmap(piece)
        run = parts if in_place else self._assemble(length, parts)
        exporter = (ctypes.c_char * nbytes).from_address(run[0][0])
        # not at exit: arrays may still be in use while the interpreter shuts down, and their pages must stay mapped
        weakref.finalize(exporter, self._give_back, run).atexit = False
        return np.frombuffer(memoryview(exporter), dtype=np.uint8)

    def _claim(self, length: int) -> tuple[bool, Run, list[Run]]:
        """Free pages for a buffer of ``length`` bytes (under the lock): the head of the smallest free run that is
        large enough (True: used in place), else every free run, largest first, the last one cut to what is needed
        (False: to be moved). Also the cut-off rests too small to keep."""
        # the most recently freed first among equals: its pages are the likeliest to be in the CPU caches
        newest_first = self._free[::-1]
        fits = [r for r in newest_first if _run_bytes(r) >= length]
        chosen = [min(fits, key=_run_bytes)] if fits else sorted(newest_first, key=_run_bytes, reverse=True)
        parts: Run = []
        dropped: list[Run] = []
        for run in chosen:
            self._free.remove(run)
            self._free_bytes -= _run_bytes(run)
            head, rest = _split_run(run, length - _run_bytes(parts))
            parts.extend(head)
            if _run_bytes(rest) >= self.MIN_PIECE:
                self._free.append(rest)
                self._free_bytes += _run_bytes(rest)
            elif rest:
                dropped.append(rest)
            if _run_bytes(parts) == length:
                break
        if parts:
            self.recycled += 1
            self.recycled_bytes += _run_bytes(parts)
        return bool(fits), parts, dropped

    def _assemble(self, length: int, parts: Run) -> Run:
        """A new range of ``length`` bytes with the recycled pieces moved into its start (fresh pages after them)."""
        base = _pages.map_fresh(length)
        run: Run = []
        offset = 0
        for part in parts:
            try:
                _pages.move(part, base + offset)
            except OSError:
                _pages.unmap(part)  # never expected; that range of the new buffer simply stays fresh
            run.append((base + offset, part[1]))
            offset += part[1]
        if offset < length:
            run.append((base + offset, length - offset))
        return run

    def reserve(self, nbytes: int) -> None:
        """Maps and touches up to ``nbytes`` of free pages ahead of need (within ``max_bytes``), so that the first
        batches larger than any before do not wait for page faults."""
        if not _pages.available():
            return
        with self._lock:
            length = min(nbytes, self.max_bytes - self._free_bytes) // _pages.PAGE * _pages.PAGE
        if length < self.MIN_PIECE:
            return
        self._give_back([(_pages.map_fresh(length, populate=True), length)])

    def _give_back(self, run: Run) -> None:
        with self._lock:
            keep = min(_run_bytes(run), max(self.max_bytes - self._free_bytes, 0))
            kept, dropped = _split_run(run, keep // _pages.PAGE * _pages.PAGE)
            if _run_bytes(kept) >= self.MIN_PIECE:
                self._free.append(kept)
                self._free_bytes += _run_bytes(kept)
            else:
                dropped = run
        for piece in dropped:
            _pages.unmap(piece)

    def _after_fork(self) -> None:
        """In a forked child: the inherited free pages are nobody's (buffers in use stay mapped)."""
        self._lock = threading.RLock()
        for run in self._free:
            for piece in run:
                _pages.unmap(piece)
        self._free, self._free_bytes = [], 0


_process_pool: PagePool | None = None
_process_pool_lock = threading.Lock()
#: Free pages the process's pool maps ahead of need, in the background, when it is first used: measured on the
#: benchmark, the first batch of 64^3 patches (38 MB) after batches of slices arrived in 86-138 ms with the slices'
#: pages recycled alone, 14 MB of them, the rest faulted in while the chunks were copied; with the reserve in 51-73 ms.
SHARED_POOL_RESERVE = 64 << 20


def process_pool() -> PagePool:
    """The pool every connection of this process takes payload buffers from. Its first use starts a thread that maps
    :data:`SHARED_POOL_RESERVE` of free pages (a forked child starts with none)."""
    global _process_pool
    with _process_pool_lock:
        if _process_pool is None:
            _process_pool = PagePool()
            threading.Thread(
                target=_process_pool.reserve, args=(SHARED_POOL_RESERVE,), name="patchwire-pages", daemon=True
            ).start()
        return _process_pool


class ProcessBuffers:
    """Payload buffers from the process's pool, which is made (and its reserve mapped) only when a buffer it serves
    is first taken: a process whose payloads all come through shared memory, or are small, never maps the reserve.
    DataLoader workers start afresh every epoch; measured with two of them on the 2-core benchmark machine, the
    reserve's fresh pages cost 70 ms of their CPU per epoch of 64^3 patches read through shared memory."""

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes < PagePool.MIN_BYTES or not _pages.available():
            return np.empty(nbytes, dtype=np.uint8)
        return process_pool().take(nbytes)


PROCESS_BUFFERS = ProcessBuffers()


def _reset_process_pool_in_child() -> None:
    global _process_pool_lock
    _process_pool_lock = threading.Lock()
    if _process_pool is not None:
        _process_pool._after_fork()


os.register_at_fork(after_in_child=_reset_process_pool_in_child)
