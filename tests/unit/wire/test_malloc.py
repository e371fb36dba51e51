"""glibc's allocator thresholds as patchwire sets them: a large buffer stays in the heap instead of being mapped and
unmapped on every message (measured by glibc's own statistics, ``mallinfo2``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from patchwire.wire import malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _mapped_by(libc: ctypes.CDLL, nbytes: int) -> int:
    """How many bytes glibc serves from mmap for a malloc of ``nbytes`` (freed again at once)."""
    before = libc.mallinfo2().hblkhd
    pointer = libc.malloc(nbytes)
    try:
        return int(libc.mallinfo2().hblkhd - before)
    finally:
        libc.free(pointer)


def test_buffers_below_the_mmap_threshold_stay_in_the_heap() -> None:
    libc = _libc()
    try:
        assert malloc.tune_malloc(mmap_threshold=1 << 20) is True
        assert _mapped_by(libc, 40 << 20) >= 40 << 20  # a low threshold: 40 MB comes from mmap
        assert malloc.tune_malloc() is True  # patchwire's thresholds: 64 MiB
        assert _mapped_by(libc, 40 << 20) == 0  # the same buffer now comes from the heap
        assert malloc.tune_malloc(arena_max=2) is True
    finally:
        malloc.tune_malloc()
