"""Opening a pymia-format file: subjects, categories, entry names, shapes, and each subject's geometry as the one
``ImageProperties`` type, from ``meta/image_props`` through the wire and back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from patchwire.service._catalog import Dataset
from patchwire.service._errors import FailedPrecondition
from patchwire.service._extraction import image_properties
from patchwire.service._phantom import make_phantom_dataset, make_phantom_subject
from patchwire.wire.definition import LOC_IMGPROP_SHAPE
from patchwire.wire.geometry import ImageProperties

from _datasets import write_arrays_dataset
from _pymia_oracle import load_pymia

DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture
def tiny(tiny_h5: Path) -> Iterator[Dataset]:
    dataset = Dataset("tiny", tiny_h5)
    try:
        yield dataset
    finally:
        dataset.close()


def _pymia_properties(path: Path) -> list[object]:
    """What pymia's own ImagePropertiesExtractor reads from ``path``, per subject."""
    ex = load_pymia().extraction
    source = ex.PymiaDatasource(str(path), ex.EmptyIndexing(), ex.ImagePropertiesExtractor())
    try:
        return [source[i]["properties"] for i in range(len(source))]
    finally:
        source.close_reader()


def test_subjects_categories_entry_names_and_shapes(tiny: Dataset) -> None:
    assert tiny.subjects == ["Subject_1", "Subject_2", "Subject_3"]
    assert tiny.categories == ["images", "labels", "mask"]
    assert tiny.entry_names == {"images": ["T1", "T2"], "labels": ["GT"], "mask": ["MASK"]}
    assert tiny.subject_entries == ["0", "1", "2"]
    assert tiny.image_shapes == [(20, 24, 16, 2)] * 3
    assert tiny.require_image_shapes() is tiny.image_shapes
    assert tiny.data_location("labels", 2) == "data/labels/2"
    assert [(c, s, d.str) for c, s, d, _ in tiny.array_info(0)] == [
        ("images", (20, 24, 16, 2), "<f4"),
        ("labels", (20, 24, 16, 1), "|u1"),
        ("mask", (20, 24, 16, 1), "|u1"),
    ]


def test_geometry_is_image_properties(tiny: Dataset) -> None:
    assert tiny.geometry is not None and len(tiny.geometry) == 3
    for i, geometry in enumerate(tiny.geometry):
        assert type(geometry) is ImageProperties
        assert tiny.require_geometry(i) is geometry
        assert geometry == ImageProperties((16, 24, 20), (-10.0 * i, 12.5, -3.25), (0.9 + 0.1 * i, 1.1, 2.5), DIRECTION)
        assert geometry.shape == (20, 24, 16)
        assert all(type(v) is int for v in geometry.size)
        assert all(type(v) is float for v in (*geometry.origin, *geometry.spacing, *geometry.direction))
    assert len({*tiny.geometry}) == 3  # hashable by value, as a dict key or in a set


def test_geometry_is_what_pymia_extracts_and_survives_the_wire(tiny_h5: Path, tiny: Dataset) -> None:
    """meta/image_props -> ImageProperties -> what the extractor gives -> proto -> ImageProperties, equal to pymia's."""
    assert tiny.geometry is not None
    for stored, theirs in zip(tiny.geometry, _pymia_properties(tiny_h5), strict=True):
        extracted = image_properties(stored)
        assert extracted is not stored
        received = ImageProperties.from_proto(extracted.to_proto())
        for props in (extracted, received):
            assert props == stored
            for name in ("size", "origin", "spacing", "direction"):
                assert getattr(props, name) == tuple(getattr(theirs, name)), name
            assert props.dimensions == theirs.dimensions == 3
            assert props.number_of_components_per_pixel == theirs.number_of_components_per_pixel == 1
            assert props.pixel_id == theirs.pixel_id == 1  # sitkUInt8: pymia rebuilds them from a uint8 image


def test_geometry_written_is_geometry_read(tmp_path: Path) -> None:
    path = tmp_path / "phantom.h5"
    make_phantom_dataset(path, subjects=2, shape=(6, 7, 5), seed=1)
    dataset = Dataset("phantom", path)
    try:
        assert dataset.geometry == [make_phantom_subject(i, shape=(6, 7, 5), seed=1).geometry for i in range(2)]
    finally:
        dataset.close()


def test_a_file_without_image_properties_has_no_geometry(tmp_path: Path) -> None:
    path = write_arrays_dataset(tmp_path / "arrays.h5", [{"images": {"T1": np.zeros((4, 3, 2), np.float32)}}])
    with h5py.File(path, "a") as h5:
        del h5[LOC_IMGPROP_SHAPE.rpartition("/")[0]]
    dataset = Dataset("arrays", path)
    try:
        assert dataset.geometry is None
        with pytest.raises(FailedPrecondition, match="has no image properties"):
            dataset.require_geometry(0)
    finally:
        dataset.close()
