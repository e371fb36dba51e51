"""What makes a served file trustworthy: its identity on disk, the checks of pymia's layout, and block checksums.

- :class:`FileIdentity` is what ``os.stat`` says about a file (size, modification time in ns, inode, device). The
  server takes it when it opens a dataset and again before and after it builds every message from it: a file that
  was replaced, truncated or rewritten shows up as a different identity, and nothing read across the change is sent.
  One ``os.stat`` costs a few microseconds (measured 4 us on the development machine), against the milliseconds a
  message of samples takes to build. It cannot see a rewrite in place that keeps size and modification time (file
  systems keep the time in coarse ticks, and a writer may restore it): that is what checksums are for.
- :func:`validate_layout` checks what pymia's readers rely on (``meta/subjects``, ``meta/shapes/images_shapes``, a
  ``data/<category>/<idx>`` per subject and category whose shape is the one ``meta/shapes`` records, entry names that
  match the channel axis, image properties that match the images) and that every contiguous array lies inside the
  file. A truncated file fails here or already at open (HDF5 compares the stored end of file with the file's size).
- :class:`Checksums` holds a CRC-32 per stored block of each numeric ``data/`` array: the rows of axis 0 that the
  block cache reads as one block (``BlockCache.rows_per_block``), so a block read from disk is checked exactly once,
  before it is cached or served. They are taken when the dataset is opened, by reading the file once (about 3 GB/s
  of CRC-32 on top of the read): no sidecar file to keep in step with the data, at the price of a longer start.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import h5py
import numpy as np

from patchwire.service._errors import FailedPrecondition
from patchwire.service._pymia_format import DATA_GROUP
from patchwire.wire import definition as defs

__all__ = ["ChecksumMismatch", "Checksums", "FileIdentity", "LayoutError", "validate_layout"]


class FileIdentity(NamedTuple):
    """What ``os.stat`` says about a file; two reads of one unchanged file give equal identities. (A named tuple:
    made and compared for every message, it is cheaper than a dataclass.)"""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def changes(self, other: FileIdentity) -> str:
        """What differs, for a log line: ``size 100 -> 50, inode 7 -> 9``."""
        names = (("size", "size"), ("mtime_ns", "modification time (ns)"), ("inode", "inode"), ("device", "device"))
        return ", ".join(
            f"{label} {getattr(self, attr)} -> {getattr(other, attr)}"
            for attr, label in names
            if getattr(self, attr) != getattr(other, attr)
        )


class LayoutError(ValueError):
    """The file is HDF5 but not a consistent pymia dataset."""


class ChecksumMismatch(FailedPrecondition):
    """A block read from disk is not what the file held when it was opened."""


def _dataset(f: h5py.File, location: str) -> h5py.Dataset:
    obj = f.get(location)
    if not isinstance(obj, h5py.Dataset):
        raise LayoutError(f"{location} is missing" if obj is None else f"{location} is not an array")
    return obj


def validate_layout(f: h5py.File, file_size: int) -> None:
    """Raises LayoutError naming the first thing in ``f`` that pymia's format does not allow (see the module doc)."""
    subjects = _dataset(f, defs.LOC_SUBJECT)
    if subjects.ndim != 1 or h5py.check_string_dtype(subjects.dtype) is None:
        raise LayoutError(f"{defs.LOC_SUBJECT} must be a 1-D array of strings, is {subjects.shape} {subjects.dtype}")
    n = subjects.shape[0]
    if n == 0:
        raise LayoutError(f"{defs.LOC_SUBJECT} is empty: no subjects")
    data = f.get(DATA_GROUP)
    if not isinstance(data, h5py.Group) or not len(data):
        raise LayoutError(f"no {defs.LOC_DATA_PLACEHOLDER.format('<category>')} group")
    if defs.KEY_IMAGES not in data:
        categories = ", ".join(data)
        raise LayoutError(f"no {defs.KEY_IMAGES!r} category (categories: {categories}); pymia indexes by its shapes")
    _dataset(f, defs.LOC_SHAPE_PLACEHOLDER.format(defs.KEY_IMAGES))
    entries = [defs.subject_index_to_str(i, n) for i in range(n)]
    image_shapes: list[tuple[int, ...]] = []
    for category in data:
        shapes_loc = defs.LOC_SHAPE_PLACEHOLDER.format(category)
        shapes = _dataset(f, shapes_loc)[()] if shapes_loc in f else None
        if shapes is not None and (shapes.ndim != 2 or shapes.shape[0] != n):
            raise LayoutError(f"{shapes_loc} has shape {shapes.shape}, expected ({n}, ndim) for {n} subjects")
        names_loc = defs.LOC_NAMES_PLACEHOLDER.format(category)
        n_names = _dataset(f, names_loc).shape[0] if names_loc in f else None
        for i, entry in enumerate(entries):
            loc = f"{defs.LOC_DATA_PLACEHOLDER.format(category)}/{entry}"
            array = _dataset(f, loc)
            shape = tuple(int(v) for v in array.shape)
            if shapes is not None and tuple(int(v) for v in shapes[i]) != shape:
                recorded = tuple(int(v) for v in shapes[i])
                raise LayoutError(f"{loc} has shape {shape} but {shapes_loc}[{i}] says {recorded}")
            if n_names is not None and shape and shape[-1] != n_names:
                raise LayoutError(f"{loc} has {shape[-1]} channels but {names_loc} names {n_names} entries")
            _check_extent(array, loc, file_size)
            if category == defs.KEY_IMAGES:
                image_shapes.append(shape)
        if len(data[category]) != n:
            raise LayoutError(
                f"{defs.LOC_DATA_PLACEHOLDER.format(category)} holds {len(data[category])} arrays for {n} subjects"
            )
    _check_geometry(f, n, image_shapes)


def _check_extent(array: h5py.Dataset, loc: str, file_size: int) -> None:
    offset = array.id.get_offset()  # None unless contiguous and allocated
    if offset is not None and offset + array.id.get_storage_size() > file_size:
        raise LayoutError(
            f"{loc} ends at byte {offset + array.id.get_storage_size()} of a {file_size}-byte file (truncated?)"
        )


def _check_geometry(f: h5py.File, n: int, image_shapes: list[tuple[int, ...]]) -> None:
    locations = {
        defs.LOC_IMGPROP_SHAPE: 3,
        defs.LOC_IMGPROP_ORIGIN: 3,
        defs.LOC_IMGPROP_SPACING: 3,
        defs.LOC_IMGPROP_DIRECTION: 9,
    }
    present = [loc for loc in locations if loc in f]
    if not present:
        return
    if len(present) != len(locations):
        missing = ", ".join(loc for loc in locations if loc not in present)
        raise LayoutError(f"image properties are incomplete: {missing} missing")
    for loc, width in locations.items():
        shape = _dataset(f, loc).shape
        if shape != (n, width):
            raise LayoutError(f"{loc} has shape {shape}, expected ({n}, {width})")
    sizes = f[defs.LOC_IMGPROP_SHAPE][()]
    for i, shape in enumerate(image_shapes):
        if len(shape) >= 3 and tuple(int(v) for v in sizes[i]) != tuple(reversed(shape[:3])):
            raise LayoutError(
                f"{defs.LOC_IMGPROP_SHAPE}[{i}] is {tuple(int(v) for v in sizes[i])} (x, y, z) but the images of "
                f"subject {i} have shape {shape} (z, y, x, ...)"
            )


class Checksums:
    """CRC-32 of every stored block of a dataset's numeric ``data/`` arrays, taken at open."""

    def __init__(self, rows_per_block: Callable[[tuple[int, ...], int], int]) -> None:
        self._rows_per_block = rows_per_block
        self._crcs: dict[str, tuple[int, list[int]]] = {}  # location -> (rows per block, CRC per block)
        self.nbytes = 0
        """Bytes read to take them."""

    def take(self, location: str, array: h5py.Dataset) -> None:
        shape = tuple(int(v) for v in array.shape)
        if not shape or array.dtype.kind not in "biuf":
            return
        rows = self._rows_per_block(shape, array.dtype.itemsize)
        crcs = []
        for r0 in range(0, shape[0], rows):
            block = np.ascontiguousarray(array[r0 : r0 + rows])
            crcs.append(zlib.crc32(block.data))
            self.nbytes += block.nbytes
        self._crcs[location] = (rows, crcs)

    def covers(self, location: str) -> bool:
        return location in self._crcs

    def read(self, location: str, array: h5py.Dataset, shape: tuple[int, ...], expression: Any) -> Any:
        """``array[expression]``, read as the whole blocks it touches, each checked against its checksum first.

        Raises ChecksumMismatch naming the array and rows of the first block that differs."""
        rows, crcs = self._crcs[location]
        dim0 = shape[0]
        items = expression if isinstance(expression, tuple) else (expression,)
        first = items[0] if items else slice(None)
        lo, hi, rest = 0, dim0, None  # rows to read; ``rest`` cuts the sample from them (None: the whole expression)
        if isinstance(first, slice) and first.step in (None, 1):
            lo, hi, _ = first.indices(dim0)
            if hi <= lo:
                return array[expression]  # empty: nothing is read from disk
            rest = (slice(0, hi - lo), *items[1:])
        elif isinstance(first, int | np.integer) and -dim0 <= int(first) < dim0:
            lo = int(first) % dim0
            hi = lo + 1
            rest = (0, *items[1:])
        b0, b1 = lo // rows, math.ceil(hi / rows)
        data = array[b0 * rows : min(b1 * rows, dim0)]
        for b in range(b0, b1):
            block = data[(b - b0) * rows : (b + 1 - b0) * rows]
            if zlib.crc32(np.ascontiguousarray(block).data) != crcs[b]:
                raise ChecksumMismatch(
                    f"{location}: rows {b * rows}..{min((b + 1) * rows, dim0) - 1} differ from the file as opened "
                    "(checksum mismatch)"
                )
        if rest is None:
            return data[expression]
        first_rest = rest[0]
        offset = lo - b0 * rows
        cut = slice(first_rest.start + offset, first_rest.stop + offset) if isinstance(first_rest, slice) else offset
        return data[(cut, *rest[1:])]
