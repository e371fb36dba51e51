"""Samples to Batch messages and back: stacking by the same-shape-and-dtype rule, per-sample values of every kind,
splitting a message's samples into batches, and prediction batches read as arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import values_pb2
from patchwire.wire import batches, tensors
from patchwire.wire.errors import EncodingError, WireError
from patchwire.wire.geometry import ImageProperties
from patchwire.wire.indexexpression import IndexExpression


def round_trip(samples: list[dict[str, Any]], indices: list[int] | None = None) -> batches.DecodedBatch:
    encoded = batches.encode_batch(samples, indices if indices is not None else list(range(len(samples))), 7)
    payloads = [p if isinstance(p, memoryview) else b"".join(p) for p in encoded.payloads]
    return batches.decode_batch(encoded.batch, [np.frombuffer(p, np.uint8) for p in payloads])


def test_same_shape_and_dtype() -> None:
    a = np.zeros((2, 3), np.float32)
    assert batches.same_shape_and_dtype([a, a.copy()])
    assert not batches.same_shape_and_dtype([a, a.astype(np.float64)])
    assert not batches.same_shape_and_dtype([a, a[:1]])
    assert not batches.same_shape_and_dtype([a, 3])
    assert not batches.same_shape_and_dtype([np.array(["x"], dtype=object)] * 2)


def test_equal_arrays_are_stacked_and_others_travel_per_sample() -> None:
    samples = [
        {"images": np.full((8, 8, 2), i, np.float32), "labels": np.zeros((8 + i, 8, 1), np.uint8), "subject": f"s{i}"}
        for i in range(3)
    ]
    decoded = round_trip(samples, [10, 11, 12])
    assert decoded.stacked == {"images"} and decoded.sample_indices == [10, 11, 12] and decoded.position == 7
    assert decoded.columns["images"].shape == (3, 8, 8, 2)
    assert [a.shape for a in decoded.columns["labels"]] == [(8, 8, 1), (9, 8, 1), (10, 8, 1)]
    assert decoded.sample(1)["subject"] == "s1" and len(decoded) == 3


def test_every_value_kind_round_trips() -> None:
    properties = ImageProperties((4, 5, 6), (0.0, 1.0, 2.0), (1.0, 1.0, 2.5), tuple(np.eye(3).ravel()), 3, 1, 1)
    sample = {
        "large": np.arange(40_000, dtype=np.int32).reshape(200, 200),
        "scalar": np.float32(2.5),
        "int": 4,
        "float": 0.25,
        "str": "T1",
        "bytes": b"\x00\x01",
        "shape": (3, 4),
        "names": ["T1", "T2"],
        "nested": [["a", "b"], ["c", "d"]],
        "properties": properties,
        "index_expr": IndexExpression.of((2, slice(None), slice(1, 5))),
    }
    out = round_trip([sample, dict(sample, large=np.zeros((3, 3), np.int32))]).sample(0)
    assert np.array_equal(out["large"], sample["large"])
    assert out["scalar"] == np.float32(2.5) and isinstance(out["scalar"], np.float32)
    for key in ("int", "float", "str", "bytes", "shape", "names", "nested", "properties", "index_expr"):
        assert out[key] == sample[key], key


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, "booleans are not sent"), ([1, object()], "cannot send a list"), ({"a": 1}, "a dict cannot be sent")],
)
def test_values_without_a_wire_form(value: Any, error: str) -> None:
    with pytest.raises(EncodingError, match=error):
        batches.encode_batch([{"x": value}, {"x": value}])


def test_entries_missing_from_some_samples() -> None:
    with pytest.raises(EncodingError, match="entry 'b' is missing from some samples"):
        batches.encode_batch([{"a": 1, "b": 2}, {"a": 3}])


def test_split_stacks_pieces_that_agree() -> None:
    """A message of several batches: a piece whose arrays agree is stacked even where the whole could not be."""
    samples = [{"x": np.zeros((4, 4 if i < 2 else 5), np.float32)} for i in range(4)]
    decoded = round_trip(samples)
    assert decoded.stacked == set()
    first, second = decoded.split(2)
    assert first.stacked == {"x"} and first.columns["x"].shape == (2, 4, 4)
    assert second.stacked == {"x"} and second.columns["x"].shape == (2, 4, 5) and second.position == 9


def test_prediction_batches_read_as_arrays_per_sample() -> None:
    batch = apb.PredictionBatch(job_id="j", sample_indices=[0, 1])
    stacked, payload = tensors.array_to_tensor(np.ones((2, 3, 3, 1), np.float32), inline_bytes=0)
    batch.fields.add(key="seg", stacked=stacked)
    field = batch.fields.add(key="prob")
    for i in range(2):
        tensor, _ = tensors.array_to_tensor(np.full((i + 1, 1), i, np.float64))
        field.per_sample.values.append(values_pb2.Value(tensor=tensor))
    assert payload is not None
    arrays = batches.batch_arrays(batch, [bytes(payload)])
    assert [a.shape for a in arrays["seg"]] == [(3, 3, 1)] * 2
    assert [a.tolist() for a in arrays["prob"]] == [[[0.0]], [[1.0], [1.0]]]
    field.per_sample.values.append(values_pb2.Value(int_value=3))
    with pytest.raises(WireError, match="every per-sample value must be a tensor"):
        batches.batch_arrays(batch, [bytes(payload)])


def test_an_empty_value_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="nothing set"):
        batches.decode_value(values_pb2.Value(), iter([]))
