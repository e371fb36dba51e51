"""The transports without a server: the choice made once (a probe segment registered or not, shared memory
required, allowed or refused), every fall-back (registration failing: the wire for good; the server's files that
cannot be mapped: into the fetch segment, asked for once; a subject that does not fit: over the wire; no fetch
segment: this fetch over the wire), payloads placed in the posting segment with one strided copy, and the facade
handing its payloads to a MemoryTransport as they are."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from patchwire.client import RetryPolicy, RpcError, Timeouts
from patchwire.client._shared_memory import FetchSegments
from patchwire.client.assembly import MemoryTransport, RemoteSubjectAssembler
from patchwire.client.assembly.transports import (
    MappedVolumes,
    PostingSegment,
    WireTransport,
    choose_transport,
)
from patchwire.client.assembly.transports.wire import with_chunks
from patchwire.client.conversion import ImageProperties
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import framing, shared_memory, tensors
from patchwire.wire.batches import DecodedBatch

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")

ADDRESS = "fake:1"
VOLUME = np.arange(8 * 40 * 40 * 2, dtype=np.float32).reshape(8, 40, 40, 2)  # 100 KiB: a payload, not inline


class FakeRegistration:
    """Registers each segment once, as b"region-N" (N counts registrations), or raises ``refuse`` (from the
    ``refuse_from``-th call on). :meth:`restart`: the server forgets every registration."""

    def __init__(self, refuse: BaseException | None = None, refuse_from: int = 1) -> None:
        self.refuse = refuse
        self.refuse_from = refuse_from
        self.calls: list[tuple[shared_memory.Segment, bool]] = []
        self._regions: dict[int, bytes] = {}
        self._registered = 0

    def register(self, segment: shared_memory.Segment, for_posting: bool) -> bytes:
        self.calls.append((segment, for_posting))
        if self.refuse is not None and len(self.calls) >= self.refuse_from:
            raise self.refuse
        if id(segment) not in self._regions:
            self._registered += 1
            self._regions[id(segment)] = f"region-{self._registered}".encode()
        return self._regions[id(segment)]

    def restart(self) -> None:
        self._regions.clear()


class FakeConnection:
    """Answers FetchSubject with the response streams ``server`` makes of each request, as wire bytes."""

    address = ADDRESS

    def __init__(self, server: Callable[[apb.FetchSubjectRequest], list[bytes]]) -> None:
        self.server = server
        self.requests: list[apb.FetchSubjectRequest] = []

    def raw_stream(self, method: str) -> Callable[[apb.FetchSubjectRequest], Iterator[bytes]]:
        assert method == "/patchwire.v1.AssemblyService/FetchSubject"

        def call(request: apb.FetchSubjectRequest) -> Iterator[bytes]:
            self.requests.append(apb.FetchSubjectRequest.FromString(request.SerializeToString()))
            return iter(self.server(request))

        return call


def subject_message(**fields: Any) -> tuple[apb.FetchSubjectResponse, np.ndarray]:
    """The FetchSubject batch message of VOLUME and its payload."""
    tensor, payload = tensors.detached_tensor(VOLUME[None])
    assert payload is not None
    message = apb.FetchSubjectResponse(**fields)
    message.batch.fields.add(key="__prediction", stacked=tensor)
    return message, payload


def over_the_wire(request: apb.FetchSubjectRequest) -> list[bytes]:
    message, payload = subject_message()
    return [message.SerializeToString(), *framing.serialized_chunks(payload.reshape(-1).data.cast("B"))]


def refused_probe(exc: BaseException) -> FakeRegistration:
    return FakeRegistration(refuse=exc)


def never_drain() -> None:
    """(Nothing is in flight in these tests: there is nothing to wait for before a segment is made.)"""


def mapped(
    server: Callable[[apb.FetchSubjectRequest], list[bytes]],
    registration: FakeRegistration,
    segments: FetchSegments | None = None,
) -> MappedVolumes:
    connection: Any = FakeConnection(server)
    posting = PostingSegment(registration, 2, never_drain, WireTransport(connection))
    return MappedVolumes(connection, registration, posting, segments or FetchSegments())


# -- the choice -----------------------------------------------------------------------------------------------------


def test_shared_memory_false_keeps_to_the_wire_without_probing() -> None:
    registration = FakeRegistration()
    transport = choose_transport(FakeConnection(over_the_wire), registration, False, 1, never_drain)
    assert isinstance(transport, WireTransport) and not transport.shared and transport.name == "wire"
    assert registration.calls == []


@pytest.mark.parametrize("preference", [None, True])
def test_a_probe_segment_registered_chooses_shared_memory(preference: bool | None) -> None:
    registration = FakeRegistration()
    transport = choose_transport(FakeConnection(over_the_wire), registration, preference, 1, never_drain)
    assert isinstance(transport, MappedVolumes) and transport.shared and transport.name == "mapped volumes"
    ((probe, for_posting),) = registration.calls
    assert for_posting and probe.size == shared_memory.HEADER_BYTES  # a zero-byte probe, closed again


@pytest.mark.parametrize(
    "refusal",
    [
        RpcError("shared memory is off on this server", grpc.StatusCode.FAILED_PRECONDITION, "off"),
        OSError("no socket here"),
        shared_memory.SegmentError("uid not allowed"),
    ],
    ids=["rpc-error", "os-error", "segment-error"],
)
def test_a_probe_refused_chooses_the_wire_or_says_why_where_required(refusal: Exception) -> None:
    connection: Any = FakeConnection(over_the_wire)
    transport = choose_transport(connection, refused_probe(refusal), None, 1, never_drain)
    assert isinstance(transport, WireTransport)
    with pytest.raises(ValueError, match=f"shared_memory=True, but the server cannot use it: {refusal}"):
        choose_transport(connection, refused_probe(refusal), True, 1, never_drain)


def test_other_probe_errors_are_not_taken_for_a_refusal() -> None:
    with pytest.raises(KeyError):
        choose_transport(FakeConnection(over_the_wire), refused_probe(KeyError("bug")), None, 1, never_drain)


# -- posting --------------------------------------------------------------------------------------------------------


def test_payloads_are_placed_in_the_posting_segment_with_one_strided_copy() -> None:
    registration = FakeRegistration()
    transport = mapped(over_the_wire, registration)
    wide = np.zeros((*VOLUME.shape[:-1], 4), np.float32)
    wide[..., ::2] = VOLUME
    strided = wide[..., ::2]
    assert not strided.flags.c_contiguous
    for k in range(3):  # slots 0, 1, 0
        batch = apb.PredictionBatch(job_id="j", sample_indices=[k])
        (request,) = transport.post(batch, [strided, VOLUME[:1]])
        assert isinstance(request, apb.PostPredictionsRequest) and request.batch == batch
        assert batch.shared_memory.region == b"region-1"  # registered once, with the segment
        segment = transport.posting.slots.segment
        assert segment is not None
        sizes = (VOLUME.nbytes, VOLUME[:1].nbytes)
        placed = [segment.view(o, n) for o, n in zip(batch.shared_offsets, sizes, strict=True)]
        np.testing.assert_array_equal(placed[0].view(np.float32).reshape(VOLUME.shape), VOLUME)
        np.testing.assert_array_equal(placed[1].view(np.float32).reshape(VOLUME[:1].shape), VOLUME[:1])
    assert transport.statistics.posted_shared_bytes == 3 * (VOLUME.nbytes + VOLUME[:1].nbytes)
    assert transport.statistics.posted_wire_bytes == 0
    transport.close(idle=False)
    assert transport.posting.slots.segment is None


def test_a_posting_segment_that_cannot_be_registered_posts_and_fetches_over_the_wire_for_good() -> None:
    registration = FakeRegistration(refuse=OSError("the server moved"))
    transport = mapped(over_the_wire, registration)
    batch = apb.PredictionBatch(job_id="j", sample_indices=[0])
    assert transport.post(batch, [VOLUME]) == with_chunks(apb.PredictionBatch(job_id="j", sample_indices=[0]), [VOLUME])
    assert not transport.shared and not batch.HasField("shared_memory")
    transport.post(apb.PredictionBatch(job_id="j"), [VOLUME])
    assert len(registration.calls) == 1, "not asked again"
    decoded = transport.fetch(apb.FetchSubjectRequest(job_id="j"), "fetching")
    np.testing.assert_array_equal(decoded.sample(0)["__prediction"], VOLUME)
    assert len(registration.calls) == 1 and transport.statistics.posted_wire_bytes == 2 * VOLUME.nbytes
    assert 1 * VOLUME.nbytes < transport.statistics.fetched_wire_bytes < 1 * (VOLUME.nbytes + 1024)  # (+ framing)


def test_batches_sent_again_point_at_the_segment_registered_anew() -> None:
    registration = FakeRegistration()
    transport = mapped(over_the_wire, registration)
    batches = [with_chunks(apb.PredictionBatch(job_id="j"), [])]  # (a batch without payloads keeps no region)
    for k in range(2):
        batch = apb.PredictionBatch(job_id="j", sample_indices=[k])
        batches.append(transport.post(batch, [VOLUME]))
    registration.restart()
    transport.resending(batches)  # the registration with the restarted server: b"region-2"
    regions = [r.batch.shared_memory.region for requests in batches[1:] for r in requests]
    assert regions == [b"region-2", b"region-2"]
    assert not batches[0][0].batch.HasField("shared_memory")


# -- fetching -------------------------------------------------------------------------------------------------------


def test_a_subject_is_fetched_from_what_the_server_wrote_into_the_segment() -> None:
    registration = FakeRegistration()

    def server(request: apb.FetchSubjectRequest) -> list[bytes]:
        segment, for_posting = registration.calls[-1]
        assert not for_posting and request.shared_memory.region == b"region-1" and request.accept_files
        offset = shared_memory.HEADER_BYTES
        segment.view(offset, VOLUME.nbytes)[:] = VOLUME.reshape(-1).view(np.uint8)
        message, _ = subject_message(shared_offsets=[offset])
        return [message.SerializeToString()]

    transport = mapped(server, registration)
    volume = transport.fetch(apb.FetchSubjectRequest(job_id="j"), "fetching").sample(0)["__prediction"]
    np.testing.assert_array_equal(volume, VOLUME)
    assert transport.statistics.fetched_shared_bytes == VOLUME.nbytes
    assert transport.statistics.fetched_wire_bytes == 0


def test_files_that_cannot_be_mapped_are_asked_for_into_the_segment_once_and_a_subject_too_large_comes_by_wire() -> (
    None
):
    registration = FakeRegistration()
    connection_requests: list[apb.FetchSubjectRequest] = []

    def server(request: apb.FetchSubjectRequest) -> list[bytes]:
        connection_requests.append(apb.FetchSubjectRequest.FromString(request.SerializeToString()))
        if request.accept_files:  # files this process has no socket to collect them over
            message, _ = subject_message(shared_files=[apb.SharedFile(lease=b"lease")])
            return [message.SerializeToString()]
        return over_the_wire(request)  # (the subject did not fit the segment)

    segments = FetchSegments()
    transport = mapped(server, registration, segments)
    for _ in range(2):
        volume = transport.fetch(apb.FetchSubjectRequest(job_id="j"), "fetching").sample(0)["__prediction"]
        np.testing.assert_array_equal(volume, VOLUME)
    assert not transport.accept_files
    assert [r.accept_files for r in connection_requests] == [True, False, False], "files are asked for once"
    assert all(r.HasField("shared_memory") for r in connection_requests)
    assert len(segments.free) == 1, "the segment goes back when the subject came over the wire"
    assert 2 * VOLUME.nbytes < transport.statistics.fetched_wire_bytes < 2 * (VOLUME.nbytes + 1024)  # (+ framing)


def test_a_fetch_segment_that_cannot_be_registered_fetches_over_the_wire_this_once() -> None:
    registration = FakeRegistration(refuse=shared_memory.SegmentError("region table full"), refuse_from=1)
    seen: list[apb.FetchSubjectRequest] = []

    def server(request: apb.FetchSubjectRequest) -> list[bytes]:
        seen.append(request)
        return over_the_wire(request)

    transport = mapped(server, registration)
    volume = transport.fetch(apb.FetchSubjectRequest(job_id="j"), "fetching").sample(0)["__prediction"]
    np.testing.assert_array_equal(volume, VOLUME)
    assert not seen[0].HasField("shared_memory")
    assert transport.shared, "posting keeps to shared memory"


# -- the facade with a MemoryTransport ------------------------------------------------------------------------------


class _Acks:
    """A PostPredictions response stream: one acknowledgement per batch request read."""

    def __init__(self, requests: Iterator[Any]) -> None:
        self._requests = requests

    def __iter__(self) -> _Acks:
        return self

    def __next__(self) -> apb.PostPredictionsResponse:
        request = next(r for r in self._requests if isinstance(r, apb.PostPredictionsRequest))
        return apb.PostPredictionsResponse(accepted_samples=len(request.batch.sample_indices))

    def cancel(self) -> None:
        pass


class _Assembly:
    def CreateJob(self, request: apb.CreateJobRequest, timeout: float | None = None) -> apb.CreateJobResponse:
        assert timeout == Timeouts().unary_s  # every job call has a deadline
        return apb.CreateJobResponse(job=apb.JobInfo(job_id=request.job_id))


class FakeServerConnection:
    address = ADDRESS
    replicated = False  # (one server: no job homes to look for)
    assembly = _Assembly()
    timeouts = Timeouts()

    def post_predictions(self) -> Callable[[Iterator[Any]], _Acks]:
        return _Acks

    def close(self) -> None:
        pass


class FakeDatasource:
    _spec = None


def test_the_facade_hands_its_payloads_to_the_transport_as_they_are() -> None:
    connection: Any = FakeServerConnection()
    datasource: Any = FakeDatasource()
    asm = RemoteSubjectAssembler(connection, datasource, entries={"__prediction": 2}, retry=RetryPolicy(budget_s=0))
    transport = MemoryTransport(shared=True)
    asm.transport = transport
    wide = np.zeros((*VOLUME.shape[:-1], 4), np.float32)
    wide[..., ::2] = VOLUME
    strided = wide[..., ::2]
    asm.add_batch(strided, np.arange(len(VOLUME)))
    ((batch, (payload,)),) = transport.posted
    assert payload is strided, "no contiguous copy before the transport's own"
    assert list(batch.sample_indices) == list(range(len(VOLUME))) and asm.accepted_samples == len(VOLUME)
    assert asm.uses_shared_memory and transport.statistics.posted_shared_bytes == VOLUME.nbytes
    asm.add_batch(VOLUME[:1, :1, :1], [0])  # inline: the batch message alone, nothing for the transport
    assert len(transport.posted) == 1
    properties = ImageProperties((40, 40, 8), (0.0,) * 3, (1.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    transport.subjects[0] = DecodedBatch([0], 0, {"__prediction": [VOLUME], "properties": [properties]}, set())
    np.testing.assert_array_equal(asm.get_assembled_subject(0), VOLUME)
    assert transport.fetched[0].subject_index == 0 and asm.fetch(0)[1] == properties
    asm.close()
    assert transport.closed == [True]
