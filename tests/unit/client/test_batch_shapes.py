"""The shapes policies on hand-made batches: what is refused and how, padding with the samples' own shapes,
per-sample lists, and groups in order of first appearance."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from patchwire.client._batch_shapes import PADDED_SHAPES, apply_shapes, varying_entries


def _batch() -> dict[str, Any]:
    """Four samples: images of 2x3, 3x2, 2x3 and 1x1; stacked labels; names."""
    images = [np.full(shape, i + 1, dtype=np.float32) for i, shape in enumerate([(2, 3), (3, 2), (2, 3), (1, 1)])]
    return {
        "images": images,
        "labels": np.arange(4 * 5, dtype=np.int64).reshape(4, 5),
        "subject": ["a", "b", "c", "d"],
        "sample_index": np.array([10, 11, 12, 13], dtype=np.int64),
    }


def test_error_names_the_entry_the_shapes_and_the_options() -> None:
    assert varying_entries(_batch()) == ["images"]
    with pytest.raises(ValueError) as info:
        apply_shapes(_batch(), "error")
    message = str(info.value)
    assert "'images' arrays of samples [10, 11, 12, 13]" in message
    assert "(1, 1), (2, 3), (3, 2)" in message and "'pad'" in message and "'group'" in message
    uniform = {**_batch(), "images": np.zeros((4, 2, 2), dtype=np.float32)}
    assert apply_shapes(uniform, "error") is uniform
    mixed = {**_batch(), "images": [np.zeros(2, np.float32), np.zeros(2, np.float64)] * 2}
    with pytest.raises(ValueError, match=r"\(2,\) float32, \(2,\) float64"):
        apply_shapes(mixed, "error")
    with pytest.raises(ValueError, match="shapes must be one of"):
        apply_shapes(_batch(), "crop")


def test_pad_puts_each_sample_at_the_origin_of_the_largest_shape() -> None:
    out = apply_shapes(_batch(), "pad")
    assert isinstance(out, dict)
    images = out["images"]
    assert images.shape == (4, 3, 3) and images.dtype == np.float32
    expected = np.zeros((4, 3, 3), dtype=np.float32)
    expected[0, :2, :3], expected[1, :3, :2], expected[2, :2, :3], expected[3, :1, :1] = 1, 2, 3, 4
    assert np.array_equal(images, expected)
    assert out[PADDED_SHAPES]["images"].tolist() == [[2, 3], [3, 2], [2, 3], [1, 1]]
    assert out[PADDED_SHAPES]["labels"].tolist() == [[5]] * 4
    assert out["subject"] == ["a", "b", "c", "d"] and np.array_equal(out["labels"], _batch()["labels"])
    ranks = {**_batch(), "images": [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)] * 2}
    with pytest.raises(ValueError, match="differ in rank or dtype"):
        apply_shapes(ranks, "pad")


def test_list_gives_every_array_entry_per_sample() -> None:
    out = apply_shapes(_batch(), "list")
    assert isinstance(out, dict)
    assert [a.shape for a in out["images"]] == [(2, 3), (3, 2), (2, 3), (1, 1)]
    assert [a.tolist() for a in out["labels"]] == np.arange(20).reshape(4, 5).tolist()
    assert isinstance(out["sample_index"], np.ndarray)


def test_group_keeps_the_order_within_and_of_groups() -> None:
    groups = apply_shapes(_batch(), "group")
    assert isinstance(groups, list)
    assert [g["sample_index"].tolist() for g in groups] == [[10, 12], [11], [13]]
    assert [g["images"].shape for g in groups] == [(2, 2, 3), (1, 3, 2), (1, 1, 1)]
    assert [g["subject"] for g in groups] == [["a", "c"], ["b"], ["d"]]
    assert groups[0]["labels"].tolist() == [list(range(0, 5)), list(range(10, 15))]
    uniform = {**_batch(), "images": np.zeros((4, 2, 2), dtype=np.float32)}
    assert apply_shapes(uniform, "group") == [uniform]
