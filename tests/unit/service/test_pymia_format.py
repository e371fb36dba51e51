"""The pymia 0.3.4 on-disk format writer, its geometry checks and the phantom dataset, checked against pymia itself.

Long because the writer is compared with pymia's own creation API case by case (single and several subjects, with and
without files, geometry checks)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from patchwire.service import _phantom
from patchwire.service._phantom import (
    DIRECTION,
    ORIGIN,
    SPACING,
    default_phantom_path,
    ensure_phantom_dataset,
    make_phantom_dataset,
    make_phantom_subject,
)
from patchwire.service._pymia_format import SubjectRecord, write_pymia_dataset
from patchwire.wire.definition import (
    LOC_DATA_PLACEHOLDER,
    LOC_FILES_PLACEHOLDER,
    LOC_FILES_ROOT,
    LOC_IMGPROP_DIRECTION,
    LOC_IMGPROP_ORIGIN,
    LOC_IMGPROP_SHAPE,
    LOC_IMGPROP_SPACING,
    LOC_NAMES_PLACEHOLDER,
    LOC_SHAPE_PLACEHOLDER,
    LOC_SUBJECT,
    subject_index_to_str,
)
from patchwire.wire.geometry import ImageProperties

from _pymia_oracle import load_pymia

TINY_SHAPE = (12, 14, 10)


def _geometry(index: int, shape: tuple[int, ...]) -> ImageProperties:
    """A different, non-trivial geometry per subject (a 3-4-5 rotation about z for odd subjects).

    The values survive the text header of .mha files exactly, so pymia's file-based writer sees the same geometry.
    """
    rotation = (0.6, -0.8, 0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 1.0)
    return ImageProperties(
        size=tuple(reversed(shape)),
        origin=(-90.5 + index, 126.25, -72.0 - 2 * index),
        spacing=(0.5 * (index + 1), 1.25, 2.0),
        direction=rotation if index % 2 else DIRECTION,
    )


@pytest.fixture
def records() -> list[SubjectRecord]:
    """Three tiny phantom subjects; the last one is one slice taller (pymia allows per-subject shapes)."""
    out = []
    for i in range(3):
        shape = (TINY_SHAPE[0] + (i == 2), *TINY_SHAPE[1:])
        record = make_phantom_subject(i, shape=shape, seed=7)
        out.append(dataclasses.replace(record, geometry=_geometry(i, shape)))
    return out


def _stacked(record: SubjectRecord, category: str) -> np.ndarray:
    return np.stack(list(record.categories[category].values()), axis=-1)


def _write_mha_sources(records: Sequence[SubjectRecord], root: Path) -> list[dict[str, dict[str, str]]]:
    """Writes every entry as ``root/<subject>/<subject>_<entry>.mha``; returns each subject's files mapping."""
    all_files = []
    for record in records:
        folder = root / record.name
        folder.mkdir(parents=True)
        files: dict[str, dict[str, str]] = {}
        for category, entries in record.categories.items():
            files[category] = {}
            for entry, array in entries.items():
                image = sitk.GetImageFromArray(array)
                image.SetOrigin(record.geometry.origin)
                image.SetSpacing(record.geometry.spacing)
                image.SetDirection(record.geometry.direction)
                file = folder / f"{record.name}_{entry}.mha"
                sitk.WriteImage(image, str(file))
                files[category][entry] = str(file)
        all_files.append(files)
    return all_files


def _write_with_pymia(records: Sequence[SubjectRecord], files: list[dict[str, dict[str, str]]], path: Path) -> None:
    pm = load_pymia()
    subject_files = [
        pm.data.SubjectFile(record.name, **subject_files) for record, subject_files in zip(records, files, strict=True)
    ]
    with pm.creation.get_writer(str(path)) as writer:
        pm.creation.Traverser().traverse(
            subject_files, load=pm.creation.LoadDefault(), callback=pm.creation.get_default_callbacks(writer)
        )


def _datasets(path: Path) -> dict[str, dict[str, Any]]:
    with h5py.File(path, "r") as h5:
        names: list[str] = []
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        out = {}
        for name in names:
            dataset = h5[name]
            out[name] = {
                "shape": dataset.shape,
                "dtype": dataset.dtype,
                "string": h5py.check_string_dtype(dataset.dtype),
                "value": dataset[()],
                "chunks": dataset.chunks,
                "compression": dataset.compression,
                "layout": dataset.id.get_create_plist().get_layout(),
                "attrs": dict(dataset.attrs),
            }
        groups: list[str] = []
        h5.visititems(lambda name, obj: groups.append(name) if isinstance(obj, h5py.Group) else None)
        for name in [*groups, "/"]:
            assert dict(h5[name].attrs) == {}, name
    return out


def _identical(a: object, b: object) -> bool:
    """Same dtype and bytes; object (vlen str) arrays compared by their elements rather than their pointers."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.tolist() == b.tolist() if a.dtype == object else a.tobytes() == b.tobytes()


# --- (a) pymia reads our files --------------------------------------------------------------------------------------


def test_locations_and_index_names_match_pymia() -> None:
    definition = load_pymia().definition
    for name in (
        "LOC_DATA_PLACEHOLDER",
        "LOC_SUBJECT",
        "LOC_NAMES_PLACEHOLDER",
        "LOC_SHAPE_PLACEHOLDER",
        "LOC_FILES_ROOT",
        "LOC_FILES_PLACEHOLDER",
        "LOC_IMGPROP_SHAPE",
        "LOC_IMGPROP_ORIGIN",
        "LOC_IMGPROP_DIRECTION",
        "LOC_IMGPROP_SPACING",
    ):
        assert globals()[name] == getattr(definition, name), name
    for n in (1, 3, 9, 10, 11, 99, 100, 1234):
        for i in {0, 1, n // 2, n - 1}:
            assert subject_index_to_str(i, n) == definition.subject_index_to_str(i, n)


def test_pymia_reads_our_file_bit_exactly(tmp_path: Path, records: list[SubjectRecord]) -> None:
    path = tmp_path / "ours.h5"
    write_pymia_dataset(path, records)
    ex = load_pymia().extraction

    whole = ex.PymiaDatasource(
        str(path),
        ex.EmptyIndexing(),
        ex.ComposeExtractor(
            [
                ex.DataExtractor(categories=("images", "labels")),
                ex.SubjectExtractor(),
                ex.NamesExtractor(),
                ex.ImagePropertiesExtractor(),
                ex.ImagePropertyShapeExtractor(),
                ex.FilesExtractor(),
            ]
        ),
    )
    try:
        assert whole.get_subjects() == [r.name for r in records]
        assert len(whole) == len(records)
        for i, record in enumerate(records):
            sample = whole[i]
            assert sample["subject"] == record.name
            assert sample["subject_index"] == i
            assert sample["images_names"] == ["T1", "T2"]
            assert sample["labels_names"] == ["GT"]
            for category in ("images", "labels"):
                expected = _stacked(record, category)
                assert sample[category].dtype == expected.dtype
                assert sample[category].tobytes() == expected.tobytes()
                assert sample[category].shape == expected.shape
            properties = sample["properties"]
            geometry = record.geometry
            assert properties.size == geometry.size
            assert properties.origin == geometry.origin
            assert properties.spacing == geometry.spacing
            assert properties.direction == geometry.direction
            assert sample["shape"] == record.categories["images"]["T1"].shape
            assert sample["file_root"] == "."
            assert sample["images_files"] == [
                f"{record.name}/{record.name}_T1.mha",
                f"{record.name}/{record.name}_T2.mha",
            ]
    finally:
        whole.close_reader()

    slices = ex.PymiaDatasource(str(path), ex.SliceIndexing(), ex.DataExtractor(categories=("images", "labels")))
    try:
        expected_slices = [(i, z) for i, r in enumerate(records) for z in range(r.categories["images"]["T1"].shape[0])]
        assert len(slices) == len(expected_slices)
        for sample_index, (i, z) in enumerate(expected_slices):
            sample = slices[sample_index]
            for category in ("images", "labels"):
                expected = _stacked(records[i], category)[z]
                assert sample[category].dtype == expected.dtype
                assert sample[category].tobytes() == expected.tobytes()
    finally:
        slices.close_reader()


def test_pymia_reads_non_image_categories(tmp_path: Path, records: list[SubjectRecord]) -> None:
    extended = [
        dataclasses.replace(
            r,
            categories={
                **r.categories,
                "numerical": {"AGE": np.asarray([29 + i]), "GPA": np.asarray([2.25])},
                "gender": {"GENDER": np.array("FM"[i % 2])},
            },
        )
        for i, r in enumerate(records)
    ]
    path = tmp_path / "ours.h5"
    write_pymia_dataset(path, extended)
    with h5py.File(path, "r") as h5:
        assert h5py.check_string_dtype(h5[f"{LOC_DATA_PLACEHOLDER.format('gender')}/0"].dtype) is not None
        assert h5[LOC_SHAPE_PLACEHOLDER.format("numerical")].shape == (3, 2)
    ex = load_pymia().extraction
    source = ex.PymiaDatasource(str(path), None, ex.DataExtractor(categories=("numerical", "gender")))
    try:
        sample = source[1]
        assert sample["numerical"].dtype == np.float64
        np.testing.assert_array_equal(sample["numerical"], [[30.0, 2.25]])
        assert sample["gender"] == ["M"]
    finally:
        source.close_reader()


# --- (b) same datasets as pymia's own creation API ------------------------------------------------------------------


@pytest.mark.parametrize("with_files", [False, True], ids=["synthetic-files", "real-files"])
def test_same_datasets_as_pymia_writer(tmp_path: Path, records: list[SubjectRecord], with_files: bool) -> None:
    files = _write_mha_sources(records, tmp_path / "src")
    theirs_path = tmp_path / "pymia.h5"
    _write_with_pymia(records, files, theirs_path)
    ours_path = tmp_path / "ours.h5"
    if with_files:
        records = [dataclasses.replace(r, files=f) for r, f in zip(records, files, strict=True)]
    write_pymia_dataset(ours_path, records)

    ours, theirs = _datasets(ours_path), _datasets(theirs_path)
    assert sorted(ours) == sorted(theirs)
    for name in sorted(theirs):
        if not with_files and name.startswith("meta/files/"):
            continue  # synthetic file names versus the real .mha paths
        mine, ref = ours[name], theirs[name]
        assert mine["shape"] == ref["shape"], name
        assert mine["string"] == ref["string"], name
        if ref["string"] is None:
            assert mine["dtype"] == ref["dtype"], name
        for key in ("chunks", "compression", "layout", "attrs"):
            assert mine[key] == ref[key], (name, key)
        assert _identical(mine["value"], ref["value"]), name
    assert ours["meta/files/file_root"]["value"] == (b"." if not with_files else str(tmp_path / "src").encode())
    with open(ours_path, "rb") as f_ours, open(theirs_path, "rb") as f_theirs:
        assert f_ours.read(9) == f_theirs.read(9)  # HDF5 signature and superblock version (libver='latest')


@pytest.mark.parametrize("single_file", [False, True], ids=["one-subject", "one-file"])
def test_single_subject_matches_pymia(tmp_path: Path, records: list[SubjectRecord], single_file: bool) -> None:
    """One subject: file_root is the subject's folder. One file in all: pymia takes the file's folder as the root."""
    record = records[0]
    if single_file:
        record = _with(record, images={"T1": record.categories["images"]["T1"]})
    files = _write_mha_sources([record], tmp_path / "src")
    _write_with_pymia([record], files, tmp_path / "pymia.h5")
    write_pymia_dataset(tmp_path / "ours.h5", [dataclasses.replace(record, files=files[0])])
    ours, theirs = _datasets(tmp_path / "ours.h5"), _datasets(tmp_path / "pymia.h5")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert _identical(ours[name]["value"], theirs[name]["value"]), name
    assert ours[LOC_SUBJECT]["value"].tolist() == [b"Subject_1"]
    assert ours[LOC_FILES_ROOT]["value"] == str(tmp_path / "src" / "Subject_1").encode()


# --- the writer itself ----------------------------------------------------------------------------------------------


def test_layout(tmp_path: Path, records: list[SubjectRecord]) -> None:
    path = tmp_path / "ours.h5"
    write_pymia_dataset(path, records)
    with h5py.File(path, "r") as h5:
        assert h5[LOC_NAMES_PLACEHOLDER.format("images")][()].tolist() == [b"T1", b"T2"]
        assert h5[LOC_SHAPE_PLACEHOLDER.format("images")][()].tolist() == [
            [12, 14, 10, 2],
            [12, 14, 10, 2],
            [13, 14, 10, 2],
        ]
        assert h5[LOC_SHAPE_PLACEHOLDER.format("labels")].dtype == np.uint16
        assert h5[LOC_IMGPROP_SHAPE][()].tolist() == [[10, 14, 12], [10, 14, 12], [10, 14, 13]]
        for location in (LOC_IMGPROP_ORIGIN, LOC_IMGPROP_SPACING, LOC_IMGPROP_DIRECTION):
            assert h5[location].dtype == np.float64
        assert h5[LOC_IMGPROP_DIRECTION][1].tolist() == list(records[1].geometry.direction)
        assert h5[LOC_FILES_ROOT].shape == ()
        assert h5[LOC_FILES_PLACEHOLDER.format("labels")][()].tolist() == [
            [f"Subject_{i}/Subject_{i}_GT.mha".encode()] for i in (1, 2, 3)
        ]
        assert h5["data/labels/2"].shape == (13, 14, 10, 1)
        assert h5["data/images/0"].dtype == np.float32


def test_replaces_existing_file_and_leaves_no_temporary(tmp_path: Path, records: list[SubjectRecord]) -> None:
    path = tmp_path / "ours.h5"
    path.write_bytes(b"old")
    write_pymia_dataset(path, records[:2])
    write_pymia_dataset(path, records)
    with h5py.File(path, "r") as h5:
        assert h5[LOC_SUBJECT].shape == (3,)
    assert sorted(os.listdir(tmp_path)) == ["ours.h5"]


def test_accesses_each_subject_once_in_order(tmp_path: Path, records: list[SubjectRecord]) -> None:
    accessed: list[int] = []

    class Lazy(Sequence[SubjectRecord]):
        def __len__(self) -> int:
            return len(records)

        def __getitem__(self, index):  # type: ignore[override]
            accessed.append(index)
            return records[index]

    write_pymia_dataset(tmp_path / "ours.h5", Lazy())
    assert accessed == [0, 1, 2]


def _with(record: SubjectRecord, **categories: dict[str, np.ndarray]) -> SubjectRecord:
    return dataclasses.replace(record, categories=categories)


def _resized(geometry: ImageProperties, size: tuple[int, ...]) -> ImageProperties:
    return ImageProperties(size, geometry.origin, geometry.spacing, geometry.direction)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rs: [], "without subjects"),
        (lambda rs: [rs[0], _with(rs[1], images=rs[1].categories["images"])], "categories"),
        (
            lambda rs: [rs[0], _with(rs[1], **rs[1].categories, extra={"X": rs[1].categories["labels"]["GT"]})],
            "categories",
        ),
        (
            lambda rs: [
                rs[0],
                _with(rs[1], images={"T1": rs[1].categories["images"]["T1"]}, labels=rs[1].categories["labels"]),
            ],
            "entries",
        ),
        (
            lambda rs: [
                rs[0],
                _with(
                    rs[1], images=dict(reversed(rs[1].categories["images"].items())), labels=rs[1].categories["labels"]
                ),
            ],
            "order",
        ),
        (
            lambda rs: [
                _with(
                    rs[0],
                    images={"T1": rs[0].categories["images"]["T1"], "T2": np.zeros((3, 3, 3), np.float32)},
                    labels=rs[0].categories["labels"],
                )
            ],
            "one shape",
        ),
        (lambda rs: [_with(rs[0], images={}, labels=rs[0].categories["labels"])], "no entries"),
        (lambda rs: [_with(rs[0], labels=rs[0].categories["labels"])], "'images'"),
        (
            lambda rs: [dataclasses.replace(rs[0], geometry=_resized(rs[0].geometry, TINY_SHAPE))],
            "does not match",
        ),
        (
            lambda rs: [
                rs[0],
                _with(rs[1], images=rs[1].categories["images"], labels={"GT": np.zeros((2, 2), np.uint8)}),
            ],
            "dimensions",
        ),
        (lambda rs: [rs[0], dataclasses.replace(rs[1], files={"images": {}, "labels": {}})], "give all or none"),
        (
            lambda rs: [dataclasses.replace(rs[0], files={"images": {"T1": "a.mha"}, "labels": {"GT": "b.mha"}})],
            "no path",
        ),
    ],
    ids=[
        "no-subjects",
        "missing-category",
        "extra-category",
        "different-entries",
        "different-entry-order",
        "entry-shapes",
        "empty-category",
        "no-images",
        "geometry-size",
        "ndim",
        "mixed-files",
        "incomplete-files",
    ],
)
def test_invalid_input_raises_and_writes_nothing(
    tmp_path: Path, records: list[SubjectRecord], mutate, message: str
) -> None:
    path = tmp_path / "ours.h5"
    with pytest.raises(ValueError, match=message):
        write_pymia_dataset(path, mutate(records))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": (1, 2), "origin": (0, 0, 0), "spacing": (1, 1, 1), "direction": DIRECTION},
        {"size": (1, 2, 3), "origin": (0, 0), "spacing": (1, 1, 1), "direction": DIRECTION},
        {"size": (1, 2, 3), "origin": (0, 0, 0), "spacing": (1, 1, 1), "direction": (1, 0, 0, 1)},
        {"size": (1, 0, 3), "origin": (0, 0, 0), "spacing": (1, 1, 1), "direction": DIRECTION},
    ],
)
def test_image_geometry_validates(tmp_path: Path, records: list[SubjectRecord], kwargs: dict) -> None:
    """The writer takes only what pymia's format stores: 3-D geometry with positive sizes."""
    with pytest.raises(ValueError, match="pymia geometry"):
        write_pymia_dataset(tmp_path / "ours.h5", [dataclasses.replace(records[0], geometry=ImageProperties(**kwargs))])
    assert os.listdir(tmp_path) == []


def test_image_geometry_normalises_to_builtin_tuples() -> None:
    record = SubjectRecord(
        "S",
        {"images": {"T1": np.zeros((5, 4, 3), np.float32)}},
        ImageProperties(size=np.array([3, 4, 5]), origin=[0, 1, 2], spacing=(1, 1, 1), direction=list(DIRECTION)),
    )
    geometry = record.geometry
    assert geometry.size == (3, 4, 5)
    assert all(type(v) is int for v in geometry.size)
    assert geometry.origin == (0.0, 1.0, 2.0)
    assert all(type(v) is float for v in geometry.direction)


# --- (c) the phantom ------------------------------------------------------------------------------------------------


def _arrays(record: SubjectRecord) -> dict[str, bytes]:
    return {f"{c}/{e}": a.tobytes() for c, entries in record.categories.items() for e, a in entries.items()}


def test_phantom_is_deterministic() -> None:
    first = make_phantom_subject(1, shape=TINY_SHAPE, seed=0)
    assert _arrays(first) == _arrays(make_phantom_subject(1, shape=TINY_SHAPE, seed=0))
    other_seed = _arrays(make_phantom_subject(1, shape=TINY_SHAPE, seed=1))
    other_subject = _arrays(make_phantom_subject(2, shape=TINY_SHAPE, seed=0))
    for key, value in _arrays(first).items():
        assert other_seed[key] != value, key
        assert other_subject[key] != value, key


def test_phantom_dataset_files_are_identical_for_one_seed(tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path / "a.h5", subjects=2, shape=TINY_SHAPE, seed=5)
    make_phantom_dataset(tmp_path / "b.h5", subjects=2, shape=TINY_SHAPE, seed=5)
    make_phantom_dataset(tmp_path / "c.h5", subjects=2, shape=TINY_SHAPE, seed=6)
    a, b, c = (_datasets(tmp_path / f"{x}.h5") for x in "abc")
    assert sorted(a) == sorted(b)
    for name in a:
        assert _identical(a[name]["value"], b[name]["value"]), name
    assert a["data/images/0"]["value"].tobytes() != c["data/images/0"]["value"].tobytes()


def test_phantom_content() -> None:
    shape = (60, 72, 60)
    records = [make_phantom_subject(i, shape=shape) for i in range(2)]
    for i, record in enumerate(records):
        assert record.name == f"Subject_{i + 1}"
        assert list(record.categories) == ["images", "labels"]
        assert list(record.categories["images"]) == ["T1", "T2"]
        assert list(record.categories["labels"]) == ["GT"]
        t1, t2 = record.categories["images"]["T1"], record.categories["images"]["T2"]
        labels = record.categories["labels"]["GT"]
        assert t1.dtype == t2.dtype == np.float32
        assert labels.dtype == np.uint8
        assert t1.shape == t2.shape == labels.shape == shape
        assert np.unique(labels).tolist() == [0, 1, 2, 3, 4, 5]
        assert np.isfinite(t1).all() and np.isfinite(t2).all()
        assert t1.min() >= 0 and t2.min() >= 0
        # MR-like contrast: white matter brighter than grey matter in T1, darker in T2.
        wm, gm = labels == 1, labels == 2
        assert t1[wm].mean() > t1[gm].mean() + 100
        assert t2[wm].mean() < t2[gm].mean() - 100
        assert t1[labels == 0].mean() < t1[wm].mean() / 2
        assert record.geometry == ImageProperties(
            size=(60, 72, 60), origin=ORIGIN, spacing=SPACING, direction=DIRECTION
        )
    assert not np.array_equal(records[0].categories["labels"]["GT"], records[1].categories["labels"]["GT"])


def test_phantom_defaults_match_pymia_example_geometry() -> None:
    assert ORIGIN == (-90.0, 126.0, -72.0)
    assert SPACING == (1.0, 1.0, 1.0)
    assert DIRECTION == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert _phantom.DEFAULT_SHAPE == (181, 217, 181)


def test_phantom_dataset_is_read_by_pymia(tmp_path: Path) -> None:
    path = tmp_path / "phantom.h5"
    make_phantom_dataset(path, subjects=2, shape=TINY_SHAPE, seed=3)
    ex = load_pymia().extraction
    source = ex.PymiaDatasource(
        str(path),
        ex.SliceIndexing(),
        ex.ComposeExtractor([ex.DataExtractor(categories=("images", "labels")), ex.ImagePropertiesExtractor()]),
    )
    try:
        assert source.get_subjects() == ["Subject_1", "Subject_2"]
        assert len(source) == 2 * TINY_SHAPE[0]
        sample = source[TINY_SHAPE[0] + 4]
        expected = make_phantom_subject(1, shape=TINY_SHAPE, seed=3)
        assert sample["images"].tobytes() == _stacked(expected, "images")[4].tobytes()
        assert sample["labels"].tobytes() == _stacked(expected, "labels")[4].tobytes()
        assert sample["properties"].size == tuple(reversed(TINY_SHAPE))
        assert sample["properties"].direction == DIRECTION
    finally:
        source.close_reader()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"PATCHWIRE_HOME": "/data/pw", "HOME": "/home/u"}, "/data/pw/phantom-v1.h5"),
        ({"PATCHWIRE_HOME": "", "HOME": "/home/u"}, "/home/u/.cache/patchwire/phantom-v1.h5"),
        ({"HOME": "/home/u"}, "/home/u/.cache/patchwire/phantom-v1.h5"),
    ],
)
def test_default_phantom_path(environ: dict[str, str], expected: str) -> None:
    assert default_phantom_path(environ) == Path(expected)


def test_ensure_phantom_dataset_creates_only_if_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def small_phantom(path: Path) -> None:
        calls.append(path)
        make_phantom_dataset(path, subjects=1, shape=TINY_SHAPE)

    monkeypatch.setattr(_phantom, "make_phantom_dataset", small_phantom)
    environ = {"PATCHWIRE_HOME": str(tmp_path / "home")}
    expected = tmp_path / "home" / "phantom-v1.h5"
    assert ensure_phantom_dataset(environ=environ) == expected
    assert calls == [expected]
    assert h5py.is_hdf5(expected)
    assert ensure_phantom_dataset(environ=environ) == expected
    assert calls == [expected]

    existing = tmp_path / "mine.h5"
    existing.write_bytes(b"not regenerated")
    assert ensure_phantom_dataset(existing) == existing
    assert existing.read_bytes() == b"not regenerated"
    assert calls == [expected]
