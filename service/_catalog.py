"""Read access to one pymia-format HDF5 dataset, with handles kept open.

pymia looks datasets up by path on every read (about 20 us each); here every ``h5py.Dataset`` handle is opened
once and kept. h5py serialises all calls behind one global lock, so reads are safe from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from patchwire.service import _pymia_format as fmt
from patchwire.service._cache import BlockCache
from patchwire.service._errors import FailedPrecondition, NotFound, OutOfRange, ServiceError, bounded
from patchwire.service._integrity import ChecksumMismatch, Checksums, LayoutError, validate_layout
from patchwire.wire import definition as defs
from patchwire.wire.geometry import ImageProperties

__all__ = ["Dataset", "Entry", "to_str"]

_log = logging.getLogger(__name__)


def to_str(value: Any) -> Any:
    """pymia's byte_converter.convert_to_string: bytes become str, lists recursively, anything else unchanged."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [to_str(v) for v in value]
    return value


class Entry:
    """An open ``h5py.Dataset`` with its shape and dtype read once: h5py answers ``shape``, ``ndim``, ``dtype`` and
    ``nbytes`` by asking HDF5 each time (several microseconds each, behind its global lock), which showed up as a
    tenth of a streaming server's Python time when asked per sample."""

    __slots__ = ("checksums", "dtype", "h5", "location", "nbytes", "ndim", "shape")

    def __init__(self, h5: h5py.Dataset, location: str = "", checksums: Checksums | None = None) -> None:
        self.h5 = h5
        self.location = location
        self.checksums = checksums if checksums is not None and checksums.covers(location) else None
        """Set in verification mode: every read from disk is checked against these (whole blocks at a time)."""
        self.shape: tuple[int, ...] = tuple(int(v) for v in h5.shape)
        self.ndim = len(self.shape)
        self.dtype: np.dtype[Any] = h5.dtype
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, expression: Any) -> Any:
        if self.checksums is not None:
            return self.checksums.read(self.location, self.h5, self.shape, expression)
        return self.h5[expression]


class Dataset:
    """One opened version of a served dataset: metadata read and checked at open, data handles opened lazily and
    kept. A file that changes on disk is opened again as a new version (:mod:`patchwire.service._served`); the old
    one is retired, and a read from it fails with FAILED_PRECONDITION instead of returning data of either file."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        cache: BlockCache | None = None,
        *,
        generation: int = 0,
        verify: bool = False,
        on_corrupt: Callable[[Dataset, str], None] | None = None,
    ) -> None:
        self.name = name
        self._cache = cache
        self.path = Path(path)
        self.generation = generation
        """Which version of the file this is (a file opened again gets the next number); part of the cache keys."""
        self.retired = False
        self._on_corrupt = on_corrupt
        try:
            self._file = h5py.File(self.path, "r", libver="latest")
        except (OSError, FileNotFoundError) as exc:
            raise FailedPrecondition(f"dataset {name!r}: cannot open {self.path}: {exc}") from exc
        try:
            self._load(verify)
        except BaseException:
            self._file.close()
            raise
        _log.info(
            "opened dataset %r (%s): %d subjects, categories %s%s",
            name,
            self.path,
            len(self.subjects),
            self.categories,
            f", {self.checksums.nbytes} bytes checksummed" if self.checksums is not None else "",
        )

    def _load(self, verify: bool) -> None:
        name = self.name
        self._lock = threading.Lock()
        self._handles: dict[str, Entry] = {}
        f = self._file
        if defs.LOC_SUBJECT not in f:
            raise FailedPrecondition(f"dataset {name!r}: {self.path} is not in pymia format (no {defs.LOC_SUBJECT})")
        try:
            validate_layout(f, self.path.stat().st_size)
        except (LayoutError, OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"dataset {name!r}: {self.path} is not a consistent pymia dataset: {exc}") from exc
        self.subjects: list[str] = [to_str(s) for s in f[defs.LOC_SUBJECT][()].tolist()]
        data_group = f.get(fmt.DATA_GROUP)
        self.categories: list[str] = list(data_group.keys()) if data_group is not None else []
        self.entry_names: dict[str, list[str]] = {}
        for cat in self.categories:
            loc = defs.LOC_NAMES_PLACEHOLDER.format(cat)
            if loc in f:
                self.entry_names[cat] = [to_str(s) for s in f[loc][()].tolist()]
        self.subject_entries = [defs.subject_index_to_str(i, len(self.subjects)) for i in range(len(self.subjects))]
        self.image_shapes: list[tuple[int, ...]] | None = None
        loc = defs.LOC_SHAPE_PLACEHOLDER.format(defs.KEY_IMAGES)
        if loc in f:
            self.image_shapes = [tuple(int(v) for v in row) for row in f[loc][()]]
        self.geometry: list[ImageProperties] | None = fmt.read_image_properties(f)
        """Each subject's image geometry (ITK order), from ``meta/image_props``; None if the file stores none."""
        self.checksums: Checksums | None = None
        if verify:
            block_bytes = self._cache.block_bytes if self._cache is not None else 1 << 20
            self.checksums = Checksums(BlockCache(0, block_bytes).rows_per_block)
            for cat in self.categories:
                for s in range(len(self.subjects)):
                    loc = self.data_location(cat, s)
                    self.checksums.take(loc, f[loc])

    # -- lookups with precise errors ------------------------------------------------------------------------------

    def check_subject(self, subject_index: int, field: str = "subject_index") -> int:
        n = len(self.subjects)
        if not 0 <= subject_index < n:
            raise OutOfRange(
                f"{field}: subject index {subject_index} is out of range for dataset {self.name!r} "
                f"with {n} subjects (valid: 0..{n - 1})"
            )
        return subject_index

    def check_category(self, category: str, field: str) -> str:
        if category not in self.categories:
            raise NotFound(
                f"{field}: category {bounded(category)} is not in dataset {self.name!r} "
                f"(categories: {', '.join(self.categories) or 'none'})"
            )
        return category

    def names_of(self, category: str, field: str) -> list[str]:
        self.check_category(category, field)
        try:
            return self.entry_names[category]
        except KeyError:
            raise NotFound(
                f"{field}: dataset {self.name!r} stores no entry names for category {bounded(category)} "
                f"({defs.LOC_NAMES_PLACEHOLDER.format(category)} is missing)"
            ) from None

    def require_image_shapes(self) -> list[tuple[int, ...]]:
        if self.image_shapes is None:
            raise FailedPrecondition(
                f"dataset {self.name!r} has no {defs.LOC_SHAPE_PLACEHOLDER.format(defs.KEY_IMAGES)}; "
                f"indexing needs the shapes of category {defs.KEY_IMAGES!r}"
            )
        return self.image_shapes

    def require_geometry(self, subject_index: int) -> ImageProperties:
        if self.geometry is None:
            raise FailedPrecondition(f"dataset {self.name!r} has no image properties ({defs.LOC_IMGPROP_SHAPE})")
        return self.geometry[subject_index]

    # -- raw reads ------------------------------------------------------------------------------------------------

    def handle(self, location: str) -> Entry:
        h = self._handles.get(location)
        if h is None:
            with self._lock:
                h = self._handles.get(location)
                if h is None:
                    if location not in self._file:
                        raise NotFound(f"dataset {self.name!r} has no entry {bounded(location)}")
                    h = self._handles[location] = Entry(self._file[location], location, self.checksums)
        return h

    def read(self, location: str, expression: Any = None, copy: bool = True) -> Any:
        """pymia's Hdf5Reader.read: the whole entry, or ``entry[expression]``; string arrays become lists.

        Raises FailedPrecondition when this version was retired (its file changed) or a block fails its checksum."""
        try:
            return self._read(location, expression, copy)
        except ChecksumMismatch as exc:
            reason = f"dataset {self.name!r}: {exc}"
            if self._on_corrupt is not None:
                self._on_corrupt(self, reason)
            raise ChecksumMismatch(reason) from None
        except ServiceError:
            raise
        except Exception as exc:
            if self.retired:  # closed under the read: the file changed
                raise FailedPrecondition(f"dataset {self.name!r} changed on disk during this call; retry") from exc
            raise

    def _read(self, location: str, expression: Any, copy: bool) -> Any:
        h = self.handle(location)
        if expression is None:
            data = h[()]
        else:
            n_axes = len(expression) if isinstance(expression, tuple) else 1
            if n_axes > h.ndim:
                raise OutOfRange(
                    f"index expression {bounded(expression)} has {n_axes} axes but {location} has {h.ndim} "
                    f"(shape {h.shape})"
                )
            try:
                data = None
                if self._cache is not None and isinstance(expression, tuple):
                    data = self._cache.read(
                        (self.name, self.generation, location), h, expression, copy, h.checksums is not None
                    )
                if data is None:
                    data = h[expression]
            except IndexError as exc:  # h5py's message names the index and the valid range
                raise OutOfRange(
                    f"index expression {bounded(expression)} does not fit {location} (shape {h.shape}): {exc}"
                ) from exc
        if isinstance(data, np.ndarray) and data.dtype == object:
            data = data.tolist()
        return data

    def data_location(self, category: str, subject_index: int) -> str:
        return f"{defs.LOC_DATA_PLACEHOLDER.format(category)}/{self.subject_entries[subject_index]}"

    def array_info(self, subject_index: int) -> list[tuple[str, tuple[int, ...], np.dtype[Any], bool]]:
        """(category, shape, dtype, is_string) of every data array of a subject."""
        out = []
        for cat in self.categories:
            loc = self.data_location(cat, subject_index)
            if loc not in self._file:
                continue
            h = self.handle(loc)
            is_string = h5py.check_string_dtype(h.dtype) is not None
            out.append((cat, h.shape, h.dtype, is_string))
        return out

    def close(self) -> None:
        """Retires this version: closes the file and drops its blocks from the cache. Idempotent."""
        self.retired = True
        with self._lock:
            self._handles.clear()
            self._file.close()
        if self._cache is not None:
            self._cache.discard(lambda key: isinstance(key, tuple) and key[:2] == (self.name, self.generation))
