"""The read segments of a process without a server: when a segment is used again, lent out or retired, and the
segments a parent keeps for its forked children."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from patchwire.client import _shared_reads
from patchwire.client._shared_reads import Inheritance, ReadSegments
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


def allocated_bytes(segment: shared_memory.Segment) -> int:
    """The bytes of memory the segment's pages take (its memfd's blocks)."""
    return os.fstat(segment.fileno()).st_blocks * 512


def test_a_free_segment_keeps_its_first_pages_and_gives_the_rest_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shared_reads, "KEEP_BYTES", 1 << 20)
    segments = ReadSegments()
    segment = segments.take()
    segment.view(shared_memory.HEADER_BYTES, 4 << 20)[:] = 1  # a call larger than usual
    assert allocated_bytes(segment) >= 4 << 20
    segments.give_back(segment, ok=True)
    assert segments.free == (segment,) and allocated_bytes(segment) <= 1 << 20


def _in_child(inheritance: Inheritance, marker: bytes, hold: int, done: int) -> None:
    """A forked child: claims one of its parent's segments, writes ``marker`` into it, reports what it found there
    before, and holds it until ``hold`` is readable."""
    status = 1
    try:
        inheritance.after_fork_in_child()
        segment = inheritance.claim()
        if segment is not None:
            view = segment.view(shared_memory.HEADER_BYTES, 1)
            os.write(done, bytes(view) or b"\0")
            view[:] = np.frombuffer(marker, dtype=np.uint8)
            del view
            os.read(hold, 1)
            status = 0
    finally:
        os._exit(status)


def test_forked_children_claim_their_parents_segments_one_each_and_find_earlier_childrens_pages() -> None:
    inheritance = Inheritance(count=2)
    inheritance.wanted = True
    inheritance.before_fork()
    hold_r, hold_w = os.pipe()
    done_r, done_w = os.pipe()
    children = []
    for marker in (b"A", b"B"):  # two at once: each gets a segment of its own
        pid = os.fork()
        if pid == 0:
            _in_child(inheritance, marker, hold_r, done_w)
        children.append(pid)
        assert os.read(done_r, 1) == b"\0", "a fresh segment"
    pid = os.fork()  # a third while both are held: nothing left to claim
    if pid == 0:
        inheritance.after_fork_in_child()
        os._exit(0 if inheritance.claim() is None else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.write(hold_w, b"xx")
    for child in children:
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    pid = os.fork()  # a later child (a worker of the next epoch) finds what one of them left
    if pid == 0:
        _in_child(inheritance, b"C", hold_r, done_w)
    assert os.read(done_r, 1) in (b"A", b"B")
    os.write(hold_w, b"x")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    for fd in (hold_r, hold_w, done_r, done_w):
        os.close(fd)


def test_a_process_that_reads_nothing_through_shared_memory_keeps_no_segments_for_its_children() -> None:
    inheritance = Inheritance()
    inheritance.before_fork()
    inheritance.after_fork_in_child()
    assert inheritance.claim() is None


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([-64], "outside the shared segment"),
        ([0], "outside the shared segment"),  # inside the header page
        ([1 << 40], "outside the shared segment"),
        ([4096, 8192], "2 offsets for 1 payloads"),
        ([], "0 offsets for 1 payloads"),
    ],
    ids=["negative", "header", "huge", "too-many", "none"],
)
def test_offsets_a_server_names_are_checked_before_anything_is_read(
    offsets: list[int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GetSamplesResponse.shared_offsets`` comes from the server: offsets outside the segment, or not one per
    payload, are a ProtocolError, never a read out of bounds."""
    from patchwire.client._errors import ProtocolError
    from patchwire.client._shared_reads import Target
    from patchwire.v1 import dataset_service_pb2, tensor_pb2

    segments = ReadSegments()
    monkeypatch.setattr(_shared_reads, "SEGMENTS", segments)
    segment = segments.take()
    batch = dataset_service_pb2.Batch(sample_indices=[0])
    tensor = batch.fields.add(key="images").stacked
    tensor.CopyFrom(
        tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 64, 64], chunked_nbytes=64 * 64 * 4)
    )
    with pytest.raises(ProtocolError, match=message):
        Target(segment, bytes(32), None).payloads(batch, offsets)
    assert segments.lent == 0, "nothing of the segment was lent out"
