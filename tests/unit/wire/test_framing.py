"""Batches and their chunk messages in a stream: the writer, the hand-read chunk layout, and the one reader both
ends use (with the checks that make a hostile or broken stream an error, never a crash or a hang)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from patchwire.v1 import dataset_service_pb2 as dpb
from patchwire.v1 import tensor_pb2
from patchwire.wire import framing, tensors
from patchwire.wire.batches import encode_batch
from patchwire.wire.errors import FramingError

Response = dpb.StreamBatchesResponse


def reader(**kwargs: Any) -> framing.BatchReader:
    return framing.BatchReader(Response.FromString, **kwargs)


def wire_messages(samples: list[dict[str, Any]], chunk_bytes: int = framing.CHUNK_BYTES) -> list[bytes]:
    encoded = encode_batch(samples, list(range(len(samples))))
    out = [Response(batch=encoded.batch).SerializeToString()]
    for payload in encoded.payloads:
        out.extend(framing.serialized_chunks(payload, chunk_bytes))
    return out


@given(st.integers(0, 5000), st.integers(1, 1024), st.integers(1, 4))
def test_serialized_chunks_parse_as_protobuf_and_by_hand(nbytes: int, chunk_bytes: int, parts: int) -> None:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    cut = [data[k * nbytes // parts : (k + 1) * nbytes // parts] for k in range(parts)]
    messages = list(framing.serialized_chunks([memoryview(c) for c in cut], chunk_bytes))
    assert all(len(framing.chunk_data(m) or b"") <= chunk_bytes for m in messages)
    assert b"".join(Response.FromString(m).chunk.data for m in messages) == data
    assert b"".join(bytes(framing.chunk_data(m) or b"") for m in messages) == data
    assert len(messages) == -(-nbytes // chunk_bytes)


@pytest.mark.parametrize("n", [1, 127, 128, 300, 70_000])  # (protobuf writes no empty bytes field)
def test_varint_matches_protobuf(n: int) -> None:
    assert tensor_pb2.TensorChunk(data=b"x" * n).SerializeToString() == b"\x0a" + framing.varint(n) + b"x" * n


def test_chunk_data_leaves_other_messages_to_protobuf_and_refuses_garbage() -> None:
    assert framing.chunk_data(Response(batch=dpb.Batch(position=3)).SerializeToString()) is None
    assert framing.chunk_data(b"") is None
    with pytest.raises(FramingError, match="announces 100 bytes but 1 follow"):
        framing.chunk_data(b"\x12" + framing.varint(100) + b"\x0a")
    with pytest.raises(FramingError, match="varint"):
        framing.chunk_data(b"\x12" + b"\xff" * 11)


def test_a_stream_reads_back_batch_by_batch() -> None:
    big = [{"image": np.full((40, 40, 40), i, np.float32), "name": f"s{i}"} for i in range(3)]
    messages = wire_messages(big, chunk_bytes=100_000) * 2
    r = reader()
    complete = [c for m in messages if (c := r.feed(m)) is not None]
    r.finish()
    assert len(complete) == 2
    for batch, payloads in complete:
        assert list(batch.sample_indices) == [0, 1, 2] and len(payloads) == 1
        assert tensors.tensor_to_array(batch.fields[0].stacked, payloads[0])[2, 0, 0, 0] == 2


def test_a_batch_without_chunks_is_complete_at_once() -> None:
    (message,) = wire_messages([{"label": 3}])
    batch, payloads = reader().feed(message) or (None, None)
    assert batch is not None and payloads == []


def test_payload_buffers_come_from_the_pool() -> None:
    taken: list[int] = []

    class Pool:
        def take(self, nbytes: int) -> np.ndarray:
            taken.append(nbytes)
            return np.empty(nbytes, np.uint8)

    r = reader(pool=Pool())
    for m in wire_messages([{"x": np.ones((100, 100), np.float64)}]):
        r.feed(m)
    assert taken == [80_000]


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (lambda m: m[1:], "chunk: a tensor chunk arrived before any batch announced it"),
        (lambda m: [m[0], m[0]], "batch: a new batch arrived before the previous batch's tensor chunks"),
        (lambda m: [*m, m[-1]], "chunk: a tensor chunk arrived before any batch announced it"),
        (lambda m: [Response().SerializeToString()], "payload: neither batch nor chunk is set"),
    ],
    ids=["chunk-first", "batch-before-chunks", "extra-chunk", "empty"],
)
def test_broken_streams_are_framing_errors(stream: Any, error: str) -> None:
    messages = wire_messages([{"x": np.ones((100, 100), np.float64)}], chunk_bytes=30_000)
    r = reader()
    with pytest.raises(FramingError, match=error):
        for m in stream(messages):
            r.feed(m)


def test_a_stream_cut_in_the_middle_of_a_batch() -> None:
    messages = wire_messages([{"x": np.ones((100, 100), np.float64)}], chunk_bytes=30_000)
    r = reader()
    for m in messages[:-1]:
        r.feed(m)
    with pytest.raises(FramingError, match="the stream ended in the middle"):
        r.finish()


def test_a_chunk_that_overruns_its_tensor() -> None:
    messages = wire_messages([{"x": np.ones(20_000, np.float64)}])
    r = reader()
    r.feed(messages[0])
    with pytest.raises(FramingError, match="chunk: tensor chunk overruns"):
        r.feed(next(framing.serialized_chunks(b"y" * 160_001)))


def test_admission_sees_each_batch_before_anything_is_allocated() -> None:
    seen: list[int] = []

    def admit(batch: Any) -> None:
        seen.append(len(batch.fields))
        raise PermissionError("not yours")

    r = reader(admit=admit, pool=None)
    with pytest.raises(PermissionError, match="not yours"):
        r.feed(wire_messages([{"x": np.ones(100_000, np.uint8)}])[0])
    assert seen == [1]


def test_admission_may_say_where_the_payloads_lie() -> None:
    payload = np.arange(100_000, dtype=np.uint8)
    r = reader(admit=lambda batch: [payload])
    _, payloads = r.feed(wire_messages([{"x": np.ones(100_000, np.uint8)}])[0]) or (None, None)
    assert payloads is not None and payloads[0] is payload
    r.finish()  # complete: nothing was left waiting for chunks


def test_announcements_beyond_max_bytes_are_refused_before_allocating() -> None:
    with pytest.raises(FramingError, match=r"batch\.fields: tensors announce 100000 payload bytes, more than the 1000"):
        reader(max_bytes=1000).feed(wire_messages([{"x": np.ones(100_000, np.uint8)}])[0])


def test_chunk_assembler_fills_exactly() -> None:
    tensor, payload = tensors.array_to_tensor(np.arange(10, dtype=np.uint8), inline_bytes=0)
    assembler = framing.ChunkAssembler([tensor])
    assert payload is not None and not assembler.complete
    assembler.add(bytes(payload[:4]))
    assembler.add(bytes(payload[4:]))
    assert assembler.complete and assembler.payloads()[0].tolist() == list(range(10))
