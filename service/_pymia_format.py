"""pymia 0.3.4's on-disk HDF5 dataset layout, written without pymia, and the image geometry it stores (as
:class:`~patchwire.wire.geometry.ImageProperties`, checked on the way in and read back on the way out).

pymia (``pymia.data.creation``, ``get_default_callbacks`` + ``Hdf5Writer``) writes one HDF5 file per dataset::

    data/<category>/<idx>            per subject and category: np.stack(entries, axis=-1), the array's own dtype
    meta/subjects                    (N,) vlen str, subject names in order
    meta/names/<category>_names      (n_entries,) vlen str, entry names = channel order
    meta/shapes/<category>_shapes    (N, ndim) uint16, numpy shape of data/<category>/<idx>
    meta/files/file_root             () vlen str, common root of the source files
    meta/files/<category>_files      (N, n_entries) vlen str, source files relative to file_root
    meta/image_props/shapes          (N, 3) uint16, ITK size (x, y, z)
    meta/image_props/origins         (N, 3) float64
    meta/image_props/spacing         (N, 3) float64
    meta/image_props/directions      (N, 9) float64, row-major 3x3

``<idx>`` is :func:`~patchwire.wire.definition.subject_index_to_str`; the locations are those of
:mod:`patchwire.wire.definition`. Every dataset is contiguous (no chunking, compression or filters), has no
attributes, and the file is created with ``libver='latest'`` (superblock version 3, readable by HDF5 >= 1.10).
pymia itself is only a test dependency: the tests check that pymia reads these files and that they hold the same
datasets as files written by pymia's own creation API.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from patchwire.wire import definition as defs
from patchwire.wire.geometry import ImageProperties

__all__ = ["DATA_GROUP", "SubjectRecord", "pymia_geometry", "read_image_properties", "write_pymia_dataset"]

DATA_GROUP = defs.LOC_DATA_PLACEHOLDER.partition("/")[0]
"""``'data'``: the group that holds one ``data/<category>`` group per category."""
_STR_DTYPE = h5py.string_dtype()  # vlen UTF-8, what pymia's h5py.special_dtype(vlen=str) is
_GEOMETRY_LENGTHS = (("size", 3), ("origin", 3), ("spacing", 3), ("direction", 9))
"""What pymia stores of a geometry, and how many values of each (3-D only)."""


def pymia_geometry(geometry: ImageProperties) -> ImageProperties:
    """``geometry`` as pymia's format stores it: 3-D only (3 sizes, origins and spacings, 9 direction values, sizes
    positive), normalised to tuples of ``int`` / ``float``; a ValueError says what does not fit."""
    for name, length in _GEOMETRY_LENGTHS:
        value = tuple(getattr(geometry, name))
        if len(value) != length:
            raise ValueError(f"pymia geometry: {name} needs {length} values (3-D only), got {len(value)}")
    stored = ImageProperties(geometry.size, geometry.origin, geometry.spacing, geometry.direction)
    if any(s <= 0 for s in stored.size):
        raise ValueError(f"pymia geometry: size must be positive, got {stored.size}")
    return stored


def read_image_properties(h5: h5py.File) -> list[ImageProperties] | None:
    """Every subject's geometry from ``meta/image_props``, in subject order (None if the file stores none); what
    pymia's ImagePropertiesExtractor rebuilds from it (one component, pixel id sitkUInt8) is
    :func:`patchwire.service._extraction.image_properties`."""
    if defs.LOC_IMGPROP_SHAPE not in h5:
        return None
    sizes = h5[defs.LOC_IMGPROP_SHAPE][()]
    origins = h5[defs.LOC_IMGPROP_ORIGIN][()]
    spacings = h5[defs.LOC_IMGPROP_SPACING][()]
    directions = h5[defs.LOC_IMGPROP_DIRECTION][()]
    return [ImageProperties(sizes[i], origins[i], spacings[i], directions[i]) for i in range(len(sizes))]


@dataclass(frozen=True, eq=False)  # eq=False: equality of dicts of arrays has no single truth value
class SubjectRecord:
    """One subject of a pymia dataset, in memory."""

    name: str
    """Subject identifier, stored in ``meta/subjects``."""
    categories: dict[str, dict[str, np.ndarray]]
    """Category -> {entry name -> array in numpy (z, y, x[, ...]) order}. Dict order is channel order; every subject
    must have the same categories and the same entry names in the same order, and one category must be
    ``'images'``."""
    geometry: ImageProperties
    """ITK geometry (checked and normalised by :func:`pymia_geometry` when the record is made); its ``size`` must be
    the reversed spatial shape of the first ``images`` entry."""
    files: dict[str, dict[str, str]] | None = None
    """Category -> {entry name -> source file path}, stored in ``meta/files``. ``None`` (for every subject) stores
    synthetic names ``'<subject>/<subject>_<entry>.mha'`` relative to a ``file_root`` of ``'.'``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "geometry", pymia_geometry(self.geometry))


def write_pymia_dataset(path: str | os.PathLike[str], subjects: Sequence[SubjectRecord]) -> None:
    """Writes ``subjects`` to ``path`` in exactly the layout pymia 0.3.4's default creation callbacks produce.

    The file is written beside ``path`` under a temporary name and moved into place with :func:`os.replace`, so a
    reader never sees a half-written file; an existing file at ``path`` is replaced. Subjects are accessed once each,
    in order, so a lazy :class:`~collections.abc.Sequence` keeps only one subject in memory at a time.

    Raises:
        ValueError: no subjects; subjects with differing categories, entry names or entry order; a category with no
            entries, with entries of different shapes, or with a different number of dimensions than in the first
            subject; no ``images`` category; a geometry size that does not match the images; ``files`` given for
            some subjects but not others, or not matching the categories.
    """
    path = Path(path)
    n = len(subjects)
    if n == 0:
        raise ValueError("cannot write a pymia dataset without subjects")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with h5py.File(tmp, mode="w-", libver="latest") as h5:
            _write(h5, subjects, n)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write(h5: h5py.File, subjects: Sequence[SubjectRecord], n: int) -> None:
    names: dict[str, list[str]] = {}  # category -> entry names, from subject 0
    ndims: dict[str, int] = {}
    all_files: list[dict[str, list[str]]] = []  # per subject: category -> file paths, in entry order
    synthetic_files = False

    h5.create_dataset(defs.LOC_SUBJECT, (n,), dtype=_STR_DTYPE)
    h5.create_dataset(defs.LOC_IMGPROP_SHAPE, (n, 3), dtype=np.uint16)
    h5.create_dataset(defs.LOC_IMGPROP_ORIGIN, (n, 3), dtype=np.float64)
    h5.create_dataset(defs.LOC_IMGPROP_DIRECTION, (n, 9), dtype=np.float64)
    h5.create_dataset(defs.LOC_IMGPROP_SPACING, (n, 3), dtype=np.float64)

    for i in range(n):
        record = subjects[i]
        if i == 0:
            names = {category: list(entries) for category, entries in record.categories.items()}
            if defs.KEY_IMAGES not in names:
                raise ValueError(
                    f"subject {record.name!r} has categories {list(names)}; pymia's readers need an "
                    f"{defs.KEY_IMAGES!r} category"
                )
            synthetic_files = record.files is None
        arrays = _stack_categories(record, names)
        if i == 0:
            ndims = {category: array.ndim for category, array in arrays.items()}
            for category, ndim in ndims.items():
                h5.create_dataset(defs.LOC_SHAPE_PLACEHOLDER.format(category), (n, ndim), dtype=np.uint16)
        _check_geometry(record, names)

        index_str = defs.subject_index_to_str(i, n)
        for category, array in arrays.items():
            if array.ndim != ndims[category]:
                raise ValueError(
                    f"subject {record.name!r}: category {category!r} has {array.ndim} dimensions, "
                    f"the first subject's has {ndims[category]}"
                )
            _write_array(h5, f"{defs.LOC_DATA_PLACEHOLDER.format(category)}/{index_str}", array)
            h5[defs.LOC_SHAPE_PLACEHOLDER.format(category)][i] = array.shape
        h5[defs.LOC_SUBJECT][i] = record.name
        geometry = record.geometry
        h5[defs.LOC_IMGPROP_SHAPE][i] = geometry.size
        h5[defs.LOC_IMGPROP_ORIGIN][i] = geometry.origin
        h5[defs.LOC_IMGPROP_DIRECTION][i] = geometry.direction
        h5[defs.LOC_IMGPROP_SPACING][i] = geometry.spacing
        all_files.append(_subject_files(record, names, synthetic_files))
        del arrays, record

    for category, entry_names in names.items():
        h5.create_dataset(
            defs.LOC_NAMES_PLACEHOLDER.format(category), data=np.asarray(entry_names, dtype=object), dtype=_STR_DTYPE
        )
    _write_files(h5, names, all_files, synthetic_files)


def _stack_categories(record: SubjectRecord, names: Mapping[str, list[str]]) -> dict[str, np.ndarray]:
    if set(record.categories) != set(names):
        raise ValueError(
            f"subject {record.name!r} has categories {sorted(record.categories)}, the first subject has {sorted(names)}"
        )
    arrays = {}
    for category, entry_names in names.items():
        entries = record.categories[category]
        if list(entries) != entry_names:
            raise ValueError(
                f"subject {record.name!r}: category {category!r} has entries {list(entries)}, the first subject has "
                f"{entry_names} (names and their order must match: the order is the channel order)"
            )
        if not entries:
            raise ValueError(f"subject {record.name!r}: category {category!r} has no entries")
        shapes = {name: np.shape(array) for name, array in entries.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(
                f"subject {record.name!r}: entries of category {category!r} must have one shape, got {shapes}"
            )
        arrays[category] = np.stack([np.asarray(array) for array in entries.values()], axis=-1)
    return arrays


def _check_geometry(record: SubjectRecord, names: Mapping[str, list[str]]) -> None:
    first = record.categories[defs.KEY_IMAGES][names[defs.KEY_IMAGES][0]]
    spatial = tuple(reversed(np.shape(first)[:3]))
    if len(spatial) != 3 or spatial != record.geometry.size:
        raise ValueError(
            f"subject {record.name!r}: geometry size {record.geometry.size} (ITK x, y, z) does not match the first "
            f"{defs.KEY_IMAGES!r} entry's numpy shape {np.shape(first)} (z, y, x)"
        )


def _write_array(h5: h5py.File, entry: str, array: np.ndarray) -> None:
    if array.dtype.kind == "U":  # pymia stores numpy unicode as vlen str
        h5.create_dataset(entry, data=array.astype(object), dtype=_STR_DTYPE)
    else:
        h5.create_dataset(entry, data=np.ascontiguousarray(array), dtype=array.dtype)


def _subject_files(record: SubjectRecord, names: Mapping[str, list[str]], synthetic: bool) -> dict[str, list[str]]:
    if synthetic:
        if record.files is not None:
            raise ValueError(f"subject {record.name!r} has files but the first subject has none; give all or none")
        return {
            category: [f"{record.name}/{record.name}_{entry}.mha" for entry in entry_names]
            for category, entry_names in names.items()
        }
    if record.files is None:
        raise ValueError(f"subject {record.name!r} has no files but the first subject has; give all or none")
    try:
        return {
            category: [record.files[category][entry] for entry in entry_names]
            for category, entry_names in names.items()
        }
    except KeyError as exc:
        raise ValueError(f"subject {record.name!r}: files has no path for {exc}") from None


def _write_files(
    h5: h5py.File, names: Mapping[str, list[str]], all_files: list[dict[str, list[str]]], synthetic: bool
) -> None:
    if synthetic:
        file_root = "."
        relative = all_files
    else:
        paths = [p for subject_files in all_files for category_files in subject_files.values() for p in category_files]
        try:
            file_root = os.path.commonpath(paths)
        except ValueError as exc:  # mixed absolute and relative paths, or different drives
            raise ValueError(f"files have no common root: {exc}") from None
        # pymia: `if os.path.isfile(file_root): dirname`, only true when every path is the same one file.
        # Decided on the strings here so writing never depends on the source files still existing.
        if len(set(paths)) == 1:
            file_root = os.path.dirname(file_root)
        relative = [
            {category: [os.path.relpath(p, file_root) for p in files] for category, files in subject_files.items()}
            for subject_files in all_files
        ]
    h5.create_dataset(defs.LOC_FILES_ROOT, data=file_root, dtype=_STR_DTYPE)
    for category, entry_names in names.items():
        data = np.asarray([subject_files[category] for subject_files in relative], dtype=object)
        data = data.reshape(len(relative), len(entry_names))
        h5.create_dataset(defs.LOC_FILES_PLACEHOLDER.format(category), data=data, dtype=_STR_DTYPE)
