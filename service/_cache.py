"""A bounded cache of decoded blocks, shared by every dataset and client of a server.

Numeric arrays are cut into blocks of whole rows along axis 0 (about ``block_bytes``, 1 MiB, each). A sample's
read becomes one contiguous h5py read of the blocks it touches (missing ones only), and the sample is cut from
memory. That turns
the slow access patterns of contiguous HDF5 arrays into fast ones: an axis-2 slice of a (z, y, x, c) volume reads
strided rows at ~0.1 GB/s from h5py, but its enclosing blocks at ~8 GB/s, and the next slices of that subject come
from memory; a patch's blocks serve its neighbours. A cold sparse read (a patch whose missing blocks are many times its
own size) is read directly from h5py for an array's first few such requests, so a first batch does not wait for
whole slabs: measured on 16 cold 64^3 patches of 181x217x181x2 float32, 45 ms direct against 170 ms through the
blocks. The blocks are filled from then on. The least recently used blocks are evicted beyond
``capacity_bytes``; a caller gets a copy unless it promises only to read (``copy=False``): transforms may modify
samples in place, but a sample that is only encoded for the wire needs no private copy. Blocks are read-only.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

__all__ = ["BlockCache"]


class BlockCache:
    #: Requests of slices along one later axis of an array before a copy with that axis first is built.
    MOVED_AFTER = 8
    #: Requests of grid-aligned regions of one size (patches) of an array before a tiled copy is built.
    TILED_AFTER = 4
    #: Most request counters kept for MOVED_AFTER and TILED_AFTER.
    MAX_COUNTERS = 4096
    #: Cold sparse reads of an array served directly from h5py before its blocks are filled.
    DIRECT_BEFORE_FILL = 4
    #: A read is sparse when its missing blocks hold more than this many times its own bytes...
    SPARSE_AMPLIFICATION = 8
    #: ...and h5py reads it in at most this many contiguous runs (a strided axis-2 slice, one run per element pair,
    #: is far slower read directly than through its blocks).
    DIRECT_MAX_RUNS = 8192
    #: While blocks of an array are being evicted (one was, within the last cache-full of insertions: its working set
    #: does not fit), every read whose missing blocks hold more than this many times its own bytes is read directly:
    #: refilling blocks that are evicted again before their other rows are used only multiplies the bytes read (an
    #: axial slice is a third of its block).
    THRASH_AMPLIFICATION = 2

    def __init__(self, capacity_bytes: int, block_bytes: int = 1 << 20) -> None:
        self.capacity_bytes = capacity_bytes
        self.block_bytes = block_bytes
        self._blocks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._requests: dict[Hashable, int] = {}
        self._direct: dict[Hashable, int] = {}
        self._evicted: dict[Hashable, int] = {}  # array -> insertion count when one of its blocks was evicted
        self._insertions = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def held(self) -> list[Hashable]:
        """The keys of the blocks held, least recently used first: ``(array key, block number)`` for rows of an
        array, ``(array key, "moved" | "tiled", ...)`` for its reshaped copies (where a cache's bytes go)."""
        with self._lock:
            return list(self._blocks)

    @property
    def counters(self) -> int:
        """Request counters kept for building moved and tiled copies (at most ``MAX_COUNTERS``)."""
        return len(self._requests)

    def rows_per_block(self, shape: tuple[int, ...], itemsize: int) -> int:
        row = math.prod(shape[1:]) * itemsize
        return max(1, self.block_bytes // max(row, 1))

    def read(self, key: Hashable, dataset: Any, expression: Any, copy: bool = True, whole_blocks: bool = False) -> Any:
        """``dataset[expression]`` through the cache, or None when the request is not cacheable (the caller then
        reads it directly): non-numeric data, negative or stepped indices, empty or out-of-range first axes, and reads
        whose blocks would take more than an eighth of the capacity.
        ``copy=False`` may return a read-only view of a cached block, for callers that only read the sample.
        ``whole_blocks``: the caller's direct reads read whole blocks anyway (verification checks whole blocks), so
        sparse reads are not left to it: its blocks are kept instead."""
        if self.capacity_bytes <= 0 or dataset.ndim == 0 or dataset.dtype.kind not in "biuf":
            return None
        items = expression if isinstance(expression, tuple) else (expression,)
        if not items:
            return None
        for item in items:
            if isinstance(item, slice):
                if item.step not in (None, 1) or (item.start or 0) < 0 or (item.stop is not None and item.stop < 0):
                    return None
            elif not isinstance(item, int | np.integer) or item < 0:
                return None
        moved = self._moved_read(key, dataset, items, copy)
        if moved is not None:
            return moved
        tiled = self._tiled_read(key, dataset, items, copy)
        if tiled is not None:
            return tiled
        dim0 = int(dataset.shape[0])
        first = items[0]
        if isinstance(first, slice):
            start = min(first.start or 0, dim0)
            stop = dim0 if first.stop is None else min(first.stop, dim0)
        else:
            start, stop = int(first), int(first) + 1
        if start >= stop or stop > dim0:
            return None
        rows = self.rows_per_block(tuple(dataset.shape), dataset.dtype.itemsize)
        b0, b1 = start // rows, (stop - 1) // rows
        if (b1 - b0 + 1) * self.block_bytes > self.capacity_bytes // 8:
            return None  # a read that would fill much of the cache by itself thrashes it: read directly
        rest = items[1:]
        if not whole_blocks and self._read_directly(key, dataset, rows, b0, b1, stop - start, rest):
            return None
        blocks = self._blocks_for(key, dataset, rows, b0, b1)
        if not isinstance(first, slice):
            result = blocks[0][(start - b0 * rows, *rest)]
            return result.copy() if copy and isinstance(result, np.ndarray) else result
        # cut the selection out of each block and join only the (small) pieces, never the blocks themselves
        pieces = []
        for k, block in enumerate(blocks):
            lo = (b0 + k) * rows
            pieces.append(block[(slice(max(start - lo, 0), min(stop - lo, len(block))), *rest)])
        if len(pieces) > 1:
            return np.concatenate(pieces)
        return pieces[0].copy() if copy else pieces[0]

    def _moved_read(self, key: Hashable, dataset: Any, items: tuple[Any, ...], copy: bool) -> Any:
        """Slices along a later axis (``(:, :, i)``) from a copy of the array with that axis moved to the front,
        where each such slice is contiguous. Built once a subject has had ``MOVED_AFTER`` such requests (a first
        batch stays quick), and only for arrays of at most a sixteenth of the capacity (several subjects' copies
        must fit, or shuffled access rebuilds them over and over); None otherwise."""
        axis = next((a for a, item in enumerate(items) if not isinstance(item, slice)), None)
        if not axis or dataset.nbytes > self.capacity_bytes // 16:
            return None
        for a in range(axis):
            item = items[a]
            if (item.start or 0) != 0 or (item.stop is not None and item.stop < dataset.shape[a]):
                return None
        moved_key = (key, "moved", axis)
        with self._lock:
            moved = self._blocks.get(moved_key)
            if moved is None:
                if self._count_request(moved_key) < self.MOVED_AFTER:
                    return None
            else:
                self._blocks.move_to_end(moved_key)
                self.hits += 1
        if moved is None:
            with self._build_lock:  # one build at a time: concurrent first requests would each copy the volume
                with self._lock:
                    moved = self._blocks.get(moved_key)
                if moved is None:
                    moved = _moved_copy(dataset, axis, self.block_bytes)
                    moved.flags.writeable = False
                    self.misses += 1
                    self._insert_item(moved_key, moved)
        index = int(items[axis])
        if index >= moved.shape[0]:
            return None
        result = moved[(index, *items[:axis], *items[axis + 1 :])]
        return result.copy() if copy and isinstance(result, np.ndarray) else result

    def _count_request(self, key: Hashable) -> int:
        """Counts a request towards building a copy (under ``_lock``). The counters are a heuristic: past
        ``MAX_COUNTERS`` distinct ones (regions of ever new sizes) they start over rather than grow without bound."""
        if key not in self._requests and len(self._requests) >= self.MAX_COUNTERS:
            self._requests.clear()
        self._requests[key] = self._requests.get(key, 0) + 1
        return self._requests[key]

    def _tiled_read(self, key: Hashable, dataset: Any, items: tuple[Any, ...], copy: bool) -> Any:
        """Grid-aligned regions (patches: ``(z0:z0+pz, y0:y0+py, x0:x0+px)`` with every start a multiple of the
        region's size) from a copy of the array cut into such tiles, each of them contiguous: a patch is then sent
        straight from its tile instead of being gathered from thousands of short rows of the row blocks (4096 rows of
        512 bytes for a 64^3 patch of two float32 channels). Built once an array has had ``TILED_AFTER`` requests of
        one region size, for arrays of at most a sixteenth of the capacity, like the moved copies; None otherwise
        (also for border patches that are smaller than the others)."""
        if len(items) > dataset.ndim or dataset.nbytes > self.capacity_bytes // 16:
            return None
        shape = tuple(int(d) for d in dataset.shape)
        extents: list[int] = []
        tile: list[int] = []
        for item, dim in zip(items, shape, strict=False):
            if not isinstance(item, slice):
                return None
            start = item.start or 0
            stop = dim if item.stop is None else item.stop
            size = stop - start
            if size <= 0 or stop > dim or start % size:
                return None
            extents.append(size)
            tile.append(start // size)
        if all(e == d for e, d in zip(extents[1:], shape[1:], strict=False)):
            return None  # whole rows: contiguous in the row blocks already
        tiled_key = (key, "tiled", tuple(extents))
        with self._lock:
            tiles = self._blocks.get(tiled_key)
            if tiles is None:
                if self._count_request(tiled_key) <= self.TILED_AFTER:
                    return None
            else:
                self._blocks.move_to_end(tiled_key)
                self.hits += 1
        if tiles is None:
            with self._build_lock:
                with self._lock:
                    tiles = self._blocks.get(tiled_key)
                if tiles is None:
                    tiles = _tiles(dataset, extents)
                    tiles.flags.writeable = False
                    self.misses += 1
                    self._insert_item(tiled_key, tiles)
        result = tiles[tuple(tile)]
        return result.copy() if copy else result

    def _read_directly(
        self, key: Hashable, dataset: Any, rows: int, b0: int, b1: int, n_rows: int, rest: tuple[Any, ...]
    ) -> bool:
        """Whether this read is left to the caller (h5py directly): one of the array's first cold sparse reads, or
        any read that would mostly refill evicted blocks."""
        with self._lock:  # the common case first, cheaply: every block is cached
            missing = sum(1 for b in range(b0, b1 + 1) if (key, b) not in self._blocks)
            if not missing:
                return False
            evicted_at = self._evicted.get(key)
            thrashing = evicted_at is not None and self._insertions - evicted_at <= self.capacity_bytes // max(
                self.block_bytes, 1
            )
            if not thrashing and self._direct.get(key, 0) >= self.DIRECT_BEFORE_FILL:
                return False
        shape = tuple(int(d) for d in dataset.shape)
        extents = [n_rows]
        for a, dim in enumerate(shape[1:], start=1):
            item = rest[a - 1] if a - 1 < len(rest) else slice(None)
            if isinstance(item, slice):
                start, stop, _ = item.indices(dim)
                extents.append(max(stop - start, 0))
            else:
                extents.append(1)
        partial = [a for a in range(len(shape)) if extents[a] < shape[a]]
        runs = math.prod(extents[: partial[-1]]) if partial else 1
        wanted = math.prod(extents) * dataset.dtype.itemsize
        row_bytes = math.prod(shape[1:]) * dataset.dtype.itemsize
        limit = self.THRASH_AMPLIFICATION if thrashing else self.SPARSE_AMPLIFICATION
        if runs > self.DIRECT_MAX_RUNS or missing * rows * row_bytes <= limit * wanted:
            return False
        if not thrashing:
            with self._lock:
                self._direct[key] = self._direct.get(key, 0) + 1
        return True

    def _blocks_for(self, key: Hashable, dataset: Any, rows: int, b0: int, b1: int) -> list[np.ndarray]:
        found: dict[int, np.ndarray] = {}
        with self._lock:
            for b in range(b0, b1 + 1):
                block = self._blocks.get((key, b))
                if block is not None:
                    self._blocks.move_to_end((key, b))
                    found[b] = block
            self.hits += len(found)
            self.misses += b1 - b0 + 1 - len(found)
        for b in range(b0, b1 + 1):  # one contiguous h5py read per missing block: no copies, no doubled memory
            if b not in found:
                block = dataset[b * rows : min((b + 1) * rows, dataset.shape[0])]
                block.flags.writeable = False
                found[b] = block
                self._insert_item((key, b), block)
        return [found[b] for b in range(b0, b1 + 1)]

    def _insert_item(self, key: Hashable, array: np.ndarray) -> None:
        with self._lock:
            if key in self._blocks:
                return
            self._blocks[key] = array
            self.nbytes += array.nbytes
            self._insertions += 1
            while self.nbytes > self.capacity_bytes and self._blocks:
                old_key, old = self._blocks.popitem(last=False)
                self.nbytes -= old.nbytes
                if isinstance(old_key, tuple) and len(old_key) == 2 and isinstance(old_key[1], int):
                    self._evicted[old_key[0]] = self._insertions  # a row block: its array does not fit now

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.nbytes = 0

    def discard(self, where: Callable[[Hashable], bool]) -> int:
        """Drops every block and copy of the arrays whose key ``where`` accepts (a dataset whose file changed), and
        what was counted about them; returns the bytes freed."""
        freed = 0
        with self._lock:
            for key in [k for k in self._blocks if isinstance(k, tuple) and where(k[0])]:
                freed += self._blocks.pop(key).nbytes
            self.nbytes -= freed
            # the counters of copies are keyed (array key, "moved" or "tiled", ...)
            for key in [k for k in self._requests if isinstance(k, tuple) and where(k[0])]:
                del self._requests[key]
            for counters in (self._direct, self._evicted):  # array key -> count
                for array_key in [k for k in counters if where(k)]:
                    del counters[array_key]
        return freed


# The copies below are built from slabs of rows read one after another into the new array, never from a whole-array
# read: that would hold a second copy of the array for the length of the build, and a freshly allocated array is
# slow to touch the first time (page faults: on the benchmark's virtual machine a 57 MB array cost 150 ms more
# than the copy itself).


def _moved_copy(dataset: Any, axis: int, slab_bytes: int) -> np.ndarray:
    """``dataset`` with ``axis`` moved to the front, contiguous."""
    shape = tuple(int(d) for d in dataset.shape)
    out = np.empty((shape[axis], *shape[:axis], *shape[axis + 1 :]), dtype=dataset.dtype)
    step = max(1, slab_bytes * 8 // max(dataset.nbytes // max(shape[0], 1), 1))
    for z in range(0, shape[0], step):
        out[:, z : z + step] = np.moveaxis(dataset[z : z + step], axis, 0)
    return out


def _tiles(dataset: Any, extents: list[int]) -> np.ndarray:
    """``dataset`` cut into tiles of ``extents`` on its leading axes (the remainder at the far ends dropped), as one
    contiguous array indexed ``[tile indices..., within-tile indices..., trailing axes...]``; read one row of tiles
    at a time."""
    shape = tuple(int(d) for d in dataset.shape)
    k = len(extents)
    counts = [d // e for d, e in zip(shape, extents, strict=False)]
    out = np.empty((*counts, *extents, *shape[k:]), dtype=dataset.dtype)
    inner = tuple(slice(0, n * e) for n, e in zip(counts[1:], extents[1:], strict=True))
    split = [v for n, e in zip(counts[1:], extents[1:], strict=True) for v in (n, e)]
    # within one row of tiles: [e0, n1, e1, n2, e2, ...] -> [n1, n2, ..., e0, e1, e2, ..., trailing]
    order = [1 + 2 * a for a in range(k - 1)] + [0] + [2 + 2 * a for a in range(k - 1)]
    order += list(range(2 * k - 1, 2 * k - 1 + len(shape) - k))
    for i in range(counts[0]):
        slab = dataset[(slice(i * extents[0], (i + 1) * extents[0]), *inner)]
        out[i] = slab.reshape(extents[0], *split, *shape[k:]).transpose(order)
    return out
