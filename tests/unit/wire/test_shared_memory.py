"""Segments on both ends without a server: the server's writes into a client's segment (through a mapping where its
size is sealed, with pwrite where it is not), strided arrays included."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import numpy as np
import pytest

from patchwire.wire import shared_memory

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")


@pytest.fixture
def sealed() -> Iterator[tuple[shared_memory.Segment, shared_memory.OpenedSegment]]:
    """A small segment sealed against resizing, and the server's writable hold of it."""
    segment = shared_memory.Segment(8192, sealed=True)
    server = opened(segment, writable=True)
    yield segment, server
    server.close()
    segment.close()


def opened(segment: shared_memory.Segment, writable: bool) -> shared_memory.OpenedSegment:
    """The segment as a server holds it (its own descriptor)."""
    return shared_memory.OpenedSegment(os.dup(segment.fileno()), segment.size, False, writable_map=writable)


@pytest.mark.parametrize("sealed", [True, False], ids=["mapped", "pwrite"])
def test_the_server_writes_bytes_and_strided_arrays_as_c_order_elements(sealed: bool) -> None:
    segment = shared_memory.Segment(1 << 20, sealed=sealed)
    server = opened(segment, writable=sealed)
    try:
        volume = np.arange(6 * 5 * 4 * 2, dtype=np.float32).reshape(6, 5, 4, 2)
        strided = volume.transpose(3, 0, 1, 2)  # a Permute's view: no contiguous run longer than one element
        raw = memoryview(b"0123456789")
        offsets, end = shared_memory.layout([strided.nbytes, raw.nbytes])
        server.write(offsets[0], [strided[0], strided[1]])  # parts, one after another
        server.write(offsets[1], [raw])
        got = segment.view(offsets[0], strided.nbytes).view(np.float32).reshape(strided.shape)
        np.testing.assert_array_equal(got, strided)
        assert bytes(segment.view(offsets[1], raw.nbytes)) == b"0123456789"
        assert end <= segment.size
    finally:
        server.close()
        segment.close()


def test_writes_outside_the_segment_are_refused_and_nothing_is_written(
    sealed: tuple[shared_memory.Segment, shared_memory.OpenedSegment],
) -> None:
    segment, server = sealed
    with pytest.raises(shared_memory.SegmentError, match="lie outside"):
        server.write(segment.size - 4, [np.zeros(8, dtype=np.uint8)])
    with pytest.raises(shared_memory.SegmentError, match="lie outside"):
        server.write(-1, [memoryview(b"x")])
    assert not segment.view(0, segment.size).any()


def test_a_closed_region_is_an_error_not_a_crash(
    sealed: tuple[shared_memory.Segment, shared_memory.OpenedSegment],
) -> None:
    segment, server = sealed
    server.write(shared_memory.HEADER_BYTES, [memoryview(b"ok")])
    server.close()
    with pytest.raises(shared_memory.SegmentError, match="unregistered"):
        server.write(shared_memory.HEADER_BYTES, [memoryview(b"late")])
    assert bytes(segment.view(shared_memory.HEADER_BYTES, 2)) == b"ok"


def test_a_segment_sealed_against_writing_is_an_error_not_a_crash() -> None:
    segment = shared_memory.Segment(8192, sealed=False)
    fcntl.fcntl(segment.fileno(), shared_memory._ADD_SEALS, getattr(fcntl, "F_SEAL_WRITE", 0x0008))
    server = opened(segment, writable=False)
    try:
        with pytest.raises(shared_memory.SegmentError, match="cannot be written"):
            server.write(shared_memory.HEADER_BYTES, [memoryview(b"x")])
    finally:
        server.close()
        segment.close()
