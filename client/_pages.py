"""Anonymous memory mappings whose pages can be moved between buffers (Linux ``mremap``), for payload buffers that are
reused across sizes.

A fresh page costs a fault on first touch, and on the virtual machines we measured far more than the copy that fills
it: 38 MB of fresh pages for a batch of 64^3 patches took 65-95 ms to touch while the stream was running, more than
receiving the batch itself. Pages that a process has touched before cost nothing when reused. ``mremap`` moves the
pages of a free buffer into a new buffer without copying or faulting them, so free buffers of one size (batches of
slices) can make up a buffer of another size (a batch of patches). Where there is no ``mremap`` (not Linux),
:func:`available` is False and callers use ordinary buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

__all__ = ["PAGE", "Segment", "available", "map_fresh", "move", "unmap"]

PAGE = mmap.PAGESIZE
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_FAILED = ctypes.c_void_p(-1).value

Segment = tuple[int, int]
"""(address, length) of a page-aligned range inside one mapping."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mremap.restype = ctypes.c_void_p
        libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    return _LIBC is not None


def _error(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")


def _check(result: int | None, what: str) -> int:
    if result is None or result == _FAILED:
        raise _error(what)
    return result


def map_fresh(length: int, populate: bool = False) -> int:
    """A new private anonymous read-write mapping of ``length`` bytes (a multiple of PAGE); its pages are faulted in
    by the kernel at once with ``populate``, else on first touch."""
    assert _LIBC is not None
    flags = _MAP_FLAGS | (_MAP_POPULATE if populate else 0)
    return _check(_LIBC.mmap(None, length, _PROT_RW, flags, -1, 0), f"mmap of {length} bytes")


def move(segment: Segment, destination: int) -> None:
    """Moves the pages of ``segment`` to ``destination`` (replacing what was mapped there); the segment's old range is
    unmapped."""
    assert _LIBC is not None
    address, length = segment
    _check(
        _LIBC.mremap(address, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, destination),
        f"mremap of {length} bytes",
    )


def unmap(segment: Segment) -> None:
    assert _LIBC is not None
    address, length = segment
    if _LIBC.munmap(address, length) != 0:
        raise _error(f"munmap of {length} bytes")
