"""The read segments of a process without a server: when a segment is used again, lent out or retired."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from patchwire.client._shared_reads import ReadSegments
from patchwire.wire import shared_memory

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")


def test_a_segment_is_used_again_once_its_call_returned_and_its_arrays_are_gone() -> None:
    segments = ReadSegments()
    segment = segments.take()
    array = segments.lend(segment, shared_memory.HEADER_BYTES, 16)
    assert array is not None and segments.lent == 1
    segments.give_back(segment, ok=True)
    assert not segments.free, "its arrays still view it"
    view = array[4:8]
    del array
    gc.collect()
    assert segments.lent == 1, "a view of the array keeps it lent"
    del view
    gc.collect()
    assert segments.lent == 0 and segments.free == (segment,)
    assert segments.take() is segment


def test_arrays_outlive_their_segment_being_closed() -> None:
    segments = ReadSegments(keep=0)
    segment = segments.take()
    array = segments.lend(segment, shared_memory.HEADER_BYTES, 8)
    assert array is not None
    array[:] = 7
    segments.give_back(segment, ok=False)  # retired: closed once the array is gone
    gc.collect()
    assert array.tolist() == [7] * 8


def test_a_failed_calls_segment_is_never_used_again() -> None:
    segments = ReadSegments()
    segment = segments.take()
    segments.give_back(segment, ok=False)
    assert not segments.free and segments.take() is not segment


def test_lent_segments_are_bounded_then_payloads_are_copied() -> None:
    segments = ReadSegments(lent=2)
    taken = [segments.take() for _ in range(3)]
    arrays = [segments.lend(s, shared_memory.HEADER_BYTES, 8) for s in taken]
    assert arrays[0] is not None and arrays[1] is not None
    assert arrays[2] is None, "a third segment may not be lent out: its caller copies"
    assert segments.lend(taken[0], shared_memory.HEADER_BYTES + 64, 8) is not None, "one already lent may lend more"


def test_segments_lent_out_at_a_fork_are_never_used_again() -> None:
    segments = ReadSegments()
    segment = segments.take()
    array = segments.lend(segment, shared_memory.HEADER_BYTES, 8)
    segments.give_back(segment, ok=True)
    segments.before_fork()  # a child now shares the array's pages
    del array
    gc.collect()
    assert not segments.free


def test_payloads_the_server_writes_are_what_arrays_see() -> None:
    segments = ReadSegments()
    segment = segments.take()
    segment.view(shared_memory.HEADER_BYTES, 4)[:] = np.frombuffer(b"abcd", dtype=np.uint8)
    array = segments.lend(segment, shared_memory.HEADER_BYTES, 4)
    assert array is not None and bytes(array) == b"abcd"
