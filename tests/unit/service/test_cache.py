"""The block cache returns exactly what h5py returns, never a view of its blocks, and stays within capacity."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchwire.service._cache import BlockCache

from _strategies import index_expressions

SHAPE = (23, 9, 7, 2)


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> h5py.Dataset:
    path: Path = tmp_path_factory.mktemp("cache") / "a.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
        f["s"] = np.array([b"a", b"b"], dtype=h5py.string_dtype())
    f = h5py.File(path, "r")
    yield f
    f.close()


@settings(deadline=None, max_examples=200)
@given(
    expr=index_expressions(SHAPE),
    block_rows=st.integers(1, 30),
    capacity_blocks=st.integers(0, 60),
    copies_after=st.sampled_from([0, 1 << 30]),
)
def test_cached_reads_equal_h5py(
    h5: h5py.File, expr: tuple, block_rows: int, capacity_blocks: int, copies_after: int
) -> None:
    row_bytes = 9 * 7 * 2 * 4
    cache = BlockCache(capacity_blocks * block_rows * row_bytes, block_bytes=block_rows * row_bytes)
    cache.DIRECT_BEFORE_FILL = 0  # the blocks' path (direct reads of cold sparse ones: below)
    cache.TILED_AFTER = cache.MOVED_AFTER = copies_after  # tiled and moved copies from the first request, or never
    expected = h5["x"][expr] if _nonempty(expr) else None
    for _ in range(2):  # cold, then (partly) warm
        got = cache.read("x", h5["x"], expr)
        if expected is None or capacity_blocks == 0 or _blocks_needed(expr, block_rows) * 8 > capacity_blocks:
            assert got is None or np.array_equal(got, expected)  # not cacheable: the caller reads h5py directly
            continue
        assert got is not None
        assert type(got) is type(expected) and got.dtype == expected.dtype
        assert np.shape(got) == np.shape(expected) and np.array_equal(got, expected)
        if isinstance(got, np.ndarray) and got.size:
            got[...] = 1e9  # a caller may modify its sample in place: the cache must not see it
    assert cache.nbytes <= max(cache.capacity_bytes, 0) or len(cache.held()) <= 1


def _blocks_needed(expr: tuple, block_rows: int) -> int:
    first = expr[0]
    if isinstance(first, int):
        return 1
    start = min(first.start or 0, SHAPE[0])
    stop = SHAPE[0] if first.stop is None else min(first.stop, SHAPE[0])
    return (stop - 1) // block_rows - start // block_rows + 1


def _nonempty(expr: tuple) -> bool:
    first = expr[0]
    if isinstance(first, int):
        return True
    start = min(first.start or 0, SHAPE[0])
    stop = SHAPE[0] if first.stop is None else min(first.stop, SHAPE[0])
    return start < stop


def test_not_cacheable_reads_fall_through(h5: h5py.File) -> None:
    cache = BlockCache(1 << 20)
    assert cache.read("s", h5["s"], (0,)) is None  # strings
    assert cache.read("x", h5["x"], (slice(None, None, 2),)) is None  # steps
    assert cache.read("x", h5["x"], (-1,)) is None  # negative indices (h5py's own semantics apply)
    assert cache.read("x", h5["x"], (99,)) is None  # out of range: h5py raises its error
    assert BlockCache(0).read("x", h5["x"], (1,)) is None  # disabled


def test_capacity_evicts_least_recently_used(h5: h5py.File) -> None:
    row = 9 * 7 * 2 * 4
    cache = BlockCache(8 * 2 * row, block_bytes=2 * row)  # eight blocks of two rows
    for z in range(0, 23, 2):
        cache.read("x", h5["x"], (z,))
    assert cache.nbytes <= cache.capacity_bytes and len(cache.held()) == 8
    assert sorted(b for _, b in cache.held()) == [4, 5, 6, 7, 8, 9, 10, 11]
    before = cache.misses
    cache.read("x", h5["x"], (21,))
    assert cache.misses == before and cache.hits > 0


def test_first_cold_sparse_reads_are_left_to_h5py_then_blocks_fill(h5: h5py.File) -> None:
    row = 9 * 7 * 2 * 4
    cache = BlockCache(1 << 20, block_bytes=4 * row)  # blocks of four rows
    cache.DIRECT_BEFORE_FILL = 2
    x = h5["x"]
    patch = (slice(4, 8), slice(1, 3), slice(2, 4))  # 4 x 2 x 2 x 2 values; its block holds 4 x 9 x 7 x 2
    assert cache.read("x", x, patch) is None and cache.read("x", x, patch) is None  # cold: read directly
    got = cache.read("x", x, patch)  # from then on through the blocks
    assert got is not None and np.array_equal(got, x[patch]) and cache.misses == 1
    assert np.array_equal(cache.read("x", x, (slice(8, 12), slice(1, 3), slice(2, 4))), x[8:12, 1:3, 2:4])
    fresh = BlockCache(1 << 20, block_bytes=4 * row)
    fresh.DIRECT_BEFORE_FILL = 2
    assert fresh.read("x", x, (5,)) is not None  # a whole row uses a quarter of its block: not sparse
    assert fresh.read("x", x, (slice(4, 8), slice(1, 3), slice(2, 4))) is not None  # its block is cached now
    fresh.DIRECT_MAX_RUNS = 3  # many short runs: h5py would read it slowly, the blocks serve it
    assert fresh.read("x", x, (slice(12, 16), slice(1, 3), slice(2, 4))) is not None


def test_arrays_whose_blocks_were_evicted_read_partial_blocks_directly(h5: h5py.File) -> None:
    row = 9 * 7 * 2 * 4
    cache = BlockCache(8 * row, block_bytes=row)  # eight blocks of one row: the array's 23 rows do not fit
    cache.DIRECT_BEFORE_FILL = 0
    x = h5["x"]
    for z in range(9):
        assert np.array_equal(cache.read("x", x, (z, slice(0, 3))), x[z, 0:3])  # the ninth evicts the first
    assert cache.read("x", x, (12, slice(0, 3))) is None  # a third of a block that would be refilled: directly
    assert np.array_equal(cache.read("x", x, (12,)), x[12])  # a whole block's worth still goes through the cache
    assert np.array_equal(cache.read("x", x, (8, slice(0, 3))), x[8, 0:3])  # and cached blocks keep serving
    for z in range(8):  # another array takes the cache over (evicting x's last blocks)...
        cache.read("y", x, (z,))
    assert cache.read("x", x, (14, slice(0, 3))) is None
    for z in range(8, 17):  # ...then more than a cache-full of insertions evict none of x's blocks...
        cache.read("y", x, (z,))
    assert cache.read("x", x, (14, slice(0, 3))) is not None  # ...and x's reads fill blocks again
    fits = BlockCache(64 * row, block_bytes=row)  # the same reads where the array fits
    fits.DIRECT_BEFORE_FILL = 0
    for z in (*range(9), 12):
        assert np.array_equal(fits.read("x", x, (z, slice(0, 3))), x[z, 0:3])


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_slices_along_later_axes_come_from_a_moved_copy(h5: h5py.File, axis: int) -> None:
    cache = BlockCache(1 << 20, block_bytes=4 << 10)
    cache.MOVED_AFTER = 2
    cache.DIRECT_BEFORE_FILL = 0
    x = h5["x"]
    for i in range(SHAPE[axis]):
        expr = (slice(None),) * axis + (i,)
        got = cache.read("x", x, expr, copy=i % 2 == 0)
        assert got is not None and np.array_equal(got, x[expr]) and got.dtype == x.dtype
        if i % 2 == 0:
            got[...] = 0  # a private copy
        tail = (slice(None),) * axis + (i, slice(1, 3)) if axis < 3 else expr
        assert np.array_equal(cache.read("x", x, tail), x[tail])
    assert any(k[1] == "moved" for k in cache.held() if isinstance(k, tuple) and len(k) == 3)
    partial = (slice(2, 5),) * axis + (0,)  # not the whole leading axes: served from blocks instead
    assert np.array_equal(cache.read("x", x, partial), x[partial])
    too_small = BlockCache(x.nbytes * 3, block_bytes=1 << 10)  # an array above a quarter of the capacity...
    too_small.MOVED_AFTER = 1
    expr = (slice(None),) * axis + (0,)
    got = too_small.read("x", x, expr)  # ...is never moved (served from blocks, or read directly by the caller)
    assert got is None or np.array_equal(got, x[expr])
    assert not any(len(k) == 3 for k in too_small.held() if isinstance(k, tuple))


def test_grid_aligned_patches_come_from_a_tiled_copy(h5: h5py.File) -> None:
    x = h5["x"]  # (23, 9, 7, 2)
    cache = BlockCache(1 << 20, block_bytes=2 << 10)
    cache.TILED_AFTER = 2
    cache.DIRECT_BEFORE_FILL = 0
    patch = (4, 3, 2)
    for _ in range(2):
        for i in range(23 // 4):
            for j in range(9 // 3):
                for k in range(7 // 2):
                    expr = (slice(i * 4, i * 4 + 4), slice(j * 3, j * 3 + 3), slice(k * 2, k * 2 + 2))
                    got = cache.read("x", x, expr, copy=(i + j) % 2 == 0)
                    assert got is not None and got.shape == (*patch, 2) and np.array_equal(got, x[expr])
                    if (i + j) % 2 == 0:
                        got[...] = -1  # a private copy: the tiles stay intact
    assert any(len(k) == 3 and k[1] == "tiled" for k in cache.held() if isinstance(k, tuple))
    tiled_reads = cache.hits
    # border patches (smaller), unaligned regions and regions of another size are served from the row blocks
    for expr in [(slice(20, 23), slice(6, 9), slice(6, 7)), (slice(1, 5), slice(0, 3), slice(0, 2)), (slice(0, 8),)]:
        assert np.array_equal(cache.read("x", x, expr), x[expr])
    assert np.array_equal(cache.read("x", x, (slice(0, 4), slice(0, 3))), x[0:4, 0:3])
    assert cache.hits > tiled_reads
    counted = BlockCache(1 << 20, block_bytes=2 << 10)
    counted.MAX_COUNTERS = 3
    for size in range(1, 8):  # regions of ever new sizes: the counters start over instead of growing
        counted.read("x", x, (slice(0, size), slice(0, 1)))
    assert counted.counters <= 3
    big = BlockCache(x.nbytes * 8, block_bytes=1 << 10)  # the array is above a sixteenth of the capacity...
    big.TILED_AFTER = 0
    big.DIRECT_BEFORE_FILL = 0
    expr = (slice(0, 4), slice(0, 3), slice(0, 2))
    assert np.array_equal(big.read("x", x, expr), x[expr])
    assert not any(len(k) == 3 for k in big.held() if isinstance(k, tuple))  # ...and is never tiled
