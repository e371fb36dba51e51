"""A hostile client: every method of both services gets thousands of malformed, extreme and mutated requests.

Asserted for every request: a documented status (never UNKNOWN or INTERNAL), a bounded message, and an answer within
its deadline. After each test: the server (a ``patchwire serve`` child process) logged no traceback and only
bounded lines, its memory stayed bounded, and it still serves the same data as a fresh read of the file and the same
assembled volumes. Requests come from Hypothesis (raw bytes, descriptor-built messages with extreme values, mutated
valid requests; derandomized, so a CI run is reproducible) and from a seeded pool sent from several threads.

``PATCHWIRE_FUZZ_EXAMPLES`` (default 4000) sets the pool's size; Hypothesis tests run an eighth of it each (at least
600). A CI run sends about 6,000 requests in all.

Long because each method family (unary, server-streaming, client-streaming) has its own generators, checks and
recovery assertions.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchwire.service._catalog import Dataset
from patchwire.service._errors import bounded_list
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import (
    assembly_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    spec_pb2,
    tensor_pb2,
)
from patchwire.wire import batches, framing, tensors

import _fuzz
from _fuzz import DOCUMENTED, DONE_JOB, LIVE_JOB, METHODS, SHAPE, SUBJECTS, Method, Outcome
from _servers import serve_process

EXAMPLES = int(os.environ.get("PATCHWIRE_FUZZ_EXAMPLES", "4000"))
HYPOTHESIS_EXAMPLES = max(600, EXAMPLES // 8)
TIMEOUT_S = 30.0
"""Deadline of every fuzzed call; an answer must come before it."""
SUBSCRIBE_TIMEOUT_S = 1.0
"""Deadline of SubscribeEvents, which waits for events while its job is active (the one call expected to run out)."""
MAX_DETAILS = 1100
"""A status message never grows with the request (the server cuts its messages at 1000 characters)."""
MAX_LOG_LINE = 1300
RSS_GROWTH_MB = 512
"""Peak resident memory the server may add over the fuzzing (requests are at most a few MB; the dataset is tiny)."""

FUZZ_SETTINGS = settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Served:
    """The fuzzed server: its process, address, a channel, its log lines and reference answers."""

    proc: subprocess.Popen[str]
    address: str
    channel: grpc.Channel
    log: list[str] = field(default_factory=list)
    baseline_rss_kb: int = 0
    reference: dict[int, np.ndarray] = field(default_factory=dict)
    h5: Path | None = None

    def __repr__(self) -> str:
        return f"Served({self.address})"

    def status_kb(self, key: str) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        assert match is not None, text
        return int(match.group(1))


def _drain(stream: Any, into: list[str]) -> None:
    for line in stream:  # the server logs a line per refused request: the pipe must never fill up
        into.append(line)


def _posted(i: int) -> float:
    return float(i % 7) - 2.5


REFERENCE_JOB = "reference-kept"
"""A completed job that no fuzzed request names (fuzzed ones may abort or delete the others): its volumes must stay."""


def _create_jobs(channel: grpc.Channel) -> None:
    stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
    for job in (LIVE_JOB, DONE_JOB, REFERENCE_JOB):
        stub.CreateJob(_fuzz.create_job_request(job), timeout=TIMEOUT_S)
    count = SHAPE[0] * SUBJECTS
    arrays = [np.full((*SHAPE[1:], 1), _posted(i), dtype=np.float32) for i in range(count)]
    tensor, parts = tensors.stacked_to_tensor(arrays)
    for job in (DONE_JOB, REFERENCE_JOB):
        batch = apb.PredictionBatch(job_id=job, sample_indices=list(range(count)))
        batch.fields.add(key="prediction", stacked=tensor)
        messages = [apb.PostPredictionsRequest(batch=batch).SerializeToString()]
        messages += list(framing.serialized_chunks(parts or []))
        post = channel.stream_stream("/patchwire.v1.AssemblyService/PostPredictions")
        replies = [apb.PostPredictionsResponse.FromString(r) for r in post(iter(messages), timeout=TIMEOUT_S)]
        assert replies[-1].job.state == apb.JOB_STATE_COMPLETED


def _decoded(replies: Any, key: str) -> list[np.ndarray]:
    """The arrays of ``key`` in a stream of Batch and TensorChunk messages, one per sample."""
    out: list[np.ndarray] = []
    batch, assembler = None, None

    def flush() -> None:
        if batch is not None and assembler is not None:
            assert assembler.complete
            payloads = iter(assembler.payloads())
            only = dataset_service_pb2.Batch()
            mine: list[np.ndarray] = []
            for f in batch.fields:  # the chunked payloads of every field, in announcement order: keep key's
                chunked = [next(payloads) for t in framing.batch_tensors(_one(f)) if t.chunked_nbytes]
                if f.key == key:
                    only.fields.append(f)
                    mine = chunked
            out.extend(batches.batch_arrays(only, mine)[key])

    for reply in replies:
        if reply.WhichOneof("payload") == "batch":
            flush()
            batch = reply.batch
            assembler = framing.ChunkAssembler(framing.batch_tensors(batch))
        else:
            assert assembler is not None
            assembler.add(reply.chunk.data)
    flush()
    return out


def _one(f: Any) -> dataset_service_pb2.Batch:
    return dataset_service_pb2.Batch(fields=[f])


def _slices(channel: grpc.Channel, indices: list[int]) -> dict[int, np.ndarray]:
    """Slices of category images through GetSamples, decoded."""
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    request = dataset_service_pb2.GetSamplesRequest(spec=_fuzz.slice_spec(_fuzz._images()), sample_indices=indices)
    arrays = _decoded(stub.GetSamples(request, timeout=TIMEOUT_S), "images")
    return dict(zip(indices, arrays, strict=True))


def _fetch(channel: grpc.Channel, subject: int) -> np.ndarray:
    stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
    request = apb.FetchSubjectRequest(job_id=REFERENCE_JOB, subject_index=subject)
    return _decoded(stub.FetchSubject(request, timeout=TIMEOUT_S), "prediction")[0]


REFERENCE_SAMPLES = [0, 13, 27, 59]


@pytest.fixture(scope="module")
def served(tiny_h5: Path) -> Iterator[Served]:
    with serve_process({"tiny": tiny_h5}) as (proc, address):
        assert proc.stderr is not None
        log: list[str] = []
        drain = threading.Thread(target=_drain, args=(proc.stderr, log), daemon=True)
        drain.start()
        options = [*framing.channel_options(), ("grpc.enable_retries", 0)]
        with grpc.insecure_channel(address, options=options) as channel:
            _create_jobs(channel)
            handle = Served(proc, address, channel, log, h5=tiny_h5)
            handle.reference = _slices(channel, REFERENCE_SAMPLES)
            fresh = Dataset("fresh", tiny_h5)
            try:  # what the server gave is what a fresh read of the file gives
                for i, array in handle.reference.items():
                    s, z = divmod(i, SHAPE[0])
                    np.testing.assert_array_equal(array, fresh.read(fresh.data_location("images", s), (z,)))
            finally:
                fresh.close()
            handle.baseline_rss_kb = handle.status_kb("VmRSS")
            yield handle


@pytest.fixture(autouse=True)
def still_healthy(served: Served) -> Iterator[None]:
    """After each test: the same data, the same volumes, bounded memory, no traceback and only bounded log lines."""
    yield
    assert served.proc.poll() is None, "the server died"
    again = _slices(served.channel, REFERENCE_SAMPLES)
    for i, array in served.reference.items():
        np.testing.assert_array_equal(again[i], array)
    for s in range(SUBJECTS):
        volume = _fetch(served.channel, s)
        expected = np.stack([np.full((*SHAPE[1:], 1), _posted(s * SHAPE[0] + z)) for z in range(SHAPE[0])])
        np.testing.assert_array_equal(volume, expected.astype(np.float32))
    peak_mb = (served.status_kb("VmHWM") - served.baseline_rss_kb) / 1024
    assert peak_mb < RSS_GROWTH_MB, f"server peak RSS grew by {peak_mb:.0f} MB"
    log = list(served.log)
    tracebacks = [line for line in log if "Traceback" in line or "unexpectedly" in line]
    assert not tracebacks, "".join(log[-60:])
    long_lines = [line[:300] for line in log if len(line) > MAX_LOG_LINE]
    assert not long_lines, long_lines[:3]


def _job_state(served: Served, job_id: str) -> int | None:
    stub = assembly_service_pb2_grpc.AssemblyServiceStub(served.channel)
    try:
        return int(stub.GetJobStatus(apb.GetJobStatusRequest(job_id=job_id), timeout=TIMEOUT_S).job.state)
    except grpc.RpcError:
        return None


def check(served: Served, method: Method, request: Any, outcome: Outcome) -> None:
    """A documented status, a bounded message, an answer before the deadline."""
    described = f"{method.name} <- {_describe(request)}: {outcome.code.name} {outcome.details[:300]!r}"
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name == "SubscribeEvents":
        # waiting for events of an active job is what a subscription does: fine only for a job that is active
        parsed = apb.SubscribeEventsRequest.FromString(request)
        assert _job_state(served, parsed.job_id) == apb.JOB_STATE_ACTIVE, described
        return
    assert outcome.code in DOCUMENTED, described
    assert len(outcome.details) <= MAX_DETAILS, described
    assert "internal error" not in outcome.details, described


def _describe(request: Any) -> str:
    if isinstance(request, bytes):
        return f"{len(request)} bytes {request[:60]!r}"
    return f"{len(request)} messages [{', '.join(_describe(r) for r in request[:3])}]"


def call(served: Served, method: Method, request: Any) -> Outcome:
    timeout = SUBSCRIBE_TIMEOUT_S if method.name == "SubscribeEvents" else TIMEOUT_S
    outcome = _fuzz.send(served.channel, method, request, timeout)
    check(served, method, request, outcome)
    return outcome


SEEDS = _fuzz.valid_requests()
methods = st.sampled_from(METHODS)


# -- Hypothesis -------------------------------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(method=methods, data=st.binary(max_size=400))
def test_random_bytes_get_a_documented_status(served: Served, method: Method, data: bytes) -> None:
    call(served, method, [data] if method.client_streaming else data)


@FUZZ_SETTINGS
@given(method=methods, seed=st.integers(0, 2**32))
def test_messages_with_extreme_values_get_a_documented_status(served: Served, method: Method, seed: int) -> None:
    rng = random.Random(seed)  # (Hypothesis's own Random draws inconsistently for this generator)
    request = _fuzz.Generator(rng, huge=0.02, method=method.name).message(method.input).SerializeToString()
    call(served, method, [request] if method.client_streaming else request)


@FUZZ_SETTINGS
@given(method=methods, seed=st.integers(0, 2**32))
def test_mutated_valid_requests_get_a_documented_status(served: Served, method: Method, seed: int) -> None:
    rng = random.Random(seed)
    seed = rng.choice(SEEDS[method.name])
    messages = [seed] if isinstance(seed, bytes) else list(seed)
    at = rng.randrange(len(messages))
    if rng.random() < 0.5:
        messages[at] = _fuzz.mutate_bytes(messages[at], rng)
    else:
        messages[at] = _fuzz.merge_extremes(messages[at], method.input, _fuzz.Generator(rng, method=method.name))
    call(served, method, messages if method.client_streaming else messages[0])


# -- a seeded pool, from several threads ------------------------------------------------------------------------------


def test_a_pool_of_hostile_requests_from_several_threads(served: Served) -> None:
    requests = _fuzz.pool(random.Random(20261204), EXAMPLES, SEEDS)
    before = _fuzz.SENT.value
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as workers:
        futures = [workers.submit(_fuzz.send, served.channel, m, r, _timeout(m)) for m, r in requests]
        outcomes = [f.result() for f in futures]
    for (method, request), outcome in zip(requests, outcomes, strict=True):
        check(served, method, request, outcome)
    assert _fuzz.SENT.value - before == EXAMPLES
    codes = {o.code for o in outcomes}
    # the pool reaches past parsing: requests are accepted, and refused for many different reasons
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= codes, codes
    for method in METHODS:
        assert any(m is method for m, _ in requests)
    # refusals were logged (one line each, checked after the test): the log being checked is the server's
    assert any("WARNING" in line and "INVALID_ARGUMENT" in line for line in list(served.log))


def _timeout(method: Method) -> float:
    return SUBSCRIBE_TIMEOUT_S if method.name == "SubscribeEvents" else TIMEOUT_S


# -- valid requests, deep nesting, named cases ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_the_valid_seeds_are_served(served: Served, method: Method) -> None:
    """The mutation seeds themselves are requests the server serves (or refuses for a documented reason)."""
    for request in SEEDS[method.name]:
        outcome = call(served, method, request)
        if method.name not in ("AbortJob", "DeleteJob", "CreateJob", "PostPredictions"):
            assert outcome.code == grpc.StatusCode.OK, (method, outcome)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_message(served: Served, method: Method) -> None:
    garbage = b"\xff\xff\xff\xff"  # a field tag whose varint never ends
    outcome = call(served, method, [garbage] if method.client_streaming else garbage)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert method.input.full_name in outcome.details, outcome


@pytest.mark.parametrize("kind", ["extractor", "transform"])
@pytest.mark.parametrize("depth", [17, 40])  # 40: 80 message levels, within protobuf's limit of 100
def test_nesting_deeper_than_the_limit_is_refused(served: Served, kind: str, depth: int) -> None:
    spec = _fuzz.nested(kind, depth)
    for name, request in (
        ("OpenDatasource", dataset_service_pb2.OpenDatasourceRequest(spec=spec)),
        ("GetSamples", dataset_service_pb2.GetSamplesRequest(spec=spec, sample_indices=[0])),
        ("StreamBatches", dataset_service_pb2.StreamBatchesRequest(spec=spec, batch_size=1)),
    ):
        outcome = call(served, _method(name), request.SerializeToString())
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome  # a limit the server's flag sets
        assert "nested too deep" in outcome.details, outcome
        assert "--max-spec-depth" in outcome.details, outcome


def test_nesting_up_to_the_limit_is_served(served: Served) -> None:
    for kind in ("extractor", "transform"):
        spec = _fuzz.nested(kind, 15)
        request = dataset_service_pb2.GetSamplesRequest(spec=spec, sample_indices=[0])
        outcome = call(served, _method("GetSamples"), request.SerializeToString())
        assert outcome.code == grpc.StatusCode.OK, outcome


@pytest.mark.parametrize("depth", [101, 1000])
def test_nesting_beyond_protobufs_recursion_limit_does_not_parse(served: Served, depth: int) -> None:
    request = _fuzz.raw_nested_extractor(depth)
    for name in ("OpenDatasource", "GetSamples"):
        outcome = call(served, _method(name), request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert f"not a patchwire.v1.{name}Request message" in outcome.details, outcome


def test_transforms_nested_60_deep_do_not_parse(served: Served) -> None:
    """60 ComposeTransforms are 120 message levels: beyond protobuf's limit of 100, refused when parsed."""
    spec = _fuzz.nested("transform", 60).SerializeToString()
    request = b"\x0a" + _fuzz.framing.varint(len(spec)) + spec  # (the request message would not take it)
    for name in ("OpenDatasource", "GetSamples", "StreamBatches"):
        outcome = call(served, _method(name), request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert f"not a patchwire.v1.{name}Request message" in outcome.details, outcome


def test_a_chunk_header_that_is_garbage_is_invalid_argument(served: Served) -> None:
    post = _method("PostPredictions")
    batch = _fuzz.prediction_batch(LIVE_JOB, [11], chunked=True)[0]
    for chunk in (b"\x12", b"\x12\x80", b"\x12\x05\x0a", b"\x12\x05\x0a\xff\xff\xff\xff\xff\xff", b"\x12\x02\x0a\x7f"):
        outcome = call(served, post, [batch, chunk])
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (chunk, outcome)


@pytest.mark.parametrize("nbytes", [1 << 40, -5, 2**63 - 1])
def test_absurd_chunked_sizes_are_invalid_argument(served: Served, nbytes: int) -> None:
    batch = apb.PredictionBatch(job_id=LIVE_JOB, sample_indices=[12])
    tensor = batch.fields.add(key="prediction").stacked
    tensor.dtype = tensors.DataType.DATA_TYPE_FLOAT32
    tensor.shape.extend([1, SHAPE[1], SHAPE[2], 1])
    tensor.chunked_nbytes = nbytes
    outcome = call(served, _method("PostPredictions"), [apb.PostPredictionsRequest(batch=batch).SerializeToString()])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "chunked_nbytes" in outcome.details or f"announces {nbytes}" in outcome.details, outcome


def test_absurd_padding_is_invalid_argument(served: Served) -> None:
    spec = _fuzz.slice_spec()
    spec.extractor.pad_data.padding.add(before=2**62, after=1)
    spec.extractor.pad_data.extractor.data.categories.append("images")
    request = dataset_service_pb2.GetSamplesRequest(spec=spec, sample_indices=[0])
    outcome = call(served, _method("GetSamples"), request.SerializeToString())
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "padding" in outcome.details, outcome


def test_many_unknown_subjects_are_listed_in_a_few_words(served: Served) -> None:
    spec = _fuzz.slice_spec(_fuzz._images())
    spec.subject_subset.values.extend(f"s{i}" for i in range(60_000))  # within --max-subjects
    request = dataset_service_pb2.OpenDatasourceRequest(spec=spec)
    outcome = call(served, _method("OpenDatasource"), request.SerializeToString())
    assert outcome.code == grpc.StatusCode.NOT_FOUND, outcome
    assert "and 59995 more" in outcome.details and len(outcome.details) < 500, outcome
    spec.subject_subset.values.extend(f"t{i}" for i in range(940_000))  # a million: over --max-subjects
    outcome = call(
        served, _method("OpenDatasource"), dataset_service_pb2.OpenDatasourceRequest(spec=spec).SerializeToString()
    )
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert "1000000 values" in outcome.details and len(outcome.details) < 500, outcome


@pytest.mark.parametrize(
    "region",
    [b"", b"..", b"/proc/1/fd/3", b"x" * 31, b"x" * 33, b"\xff" * 1_000_000],
    ids=["empty", "dotdot", "path", "short", "long", "huge"],
)
def test_hostile_shared_memory_regions_are_invalid_argument(served: Served, region: bytes) -> None:
    """A region id is 32 bytes the server made: anything else (a path, '..', nothing, a megabyte) is refused by its
    length, before any lookup, with a message that repeats none of it; a fetch, a post and a read alike."""
    fetch = apb.FetchSubjectRequest(
        job_id=DONE_JOB, subject_index=1, shared_memory=tensor_pb2.SharedMemory(region=region), accept_files=True
    )
    batch = apb.PredictionBatch(
        job_id=LIVE_JOB, sample_indices=[3], shared_memory=tensor_pb2.SharedMemory(region=region)
    )
    batch.fields.add(key="prediction").stacked.CopyFrom(
        tensor_pb2.Tensor(dtype=tensors.DataType.DATA_TYPE_FLOAT32, shape=[1, SHAPE[1], SHAPE[2], 1])
    )
    batch.fields[0].stacked.chunked_nbytes = SHAPE[1] * SHAPE[2] * 4
    batch.shared_offsets.append(4096)
    post = [apb.PostPredictionsRequest(batch=batch).SerializeToString()]
    samples = dataset_service_pb2.GetSamplesRequest(
        spec=_fuzz.slice_spec(_fuzz._images()), sample_indices=[0], shared_memory=tensor_pb2.SharedMemory(region=region)
    )
    requests = (("FetchSubject", fetch.SerializeToString()), ("PostPredictions", post))
    for name, request in (*requests, ("GetSamples", samples.SerializeToString())):
        outcome = call(served, _method(name), request)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (name, outcome)
        assert f"region id is 32 bytes, got {len(region)}" in outcome.details, (name, outcome)
        assert len(outcome.details) < 300 and "proc" not in outcome.details, (name, outcome)


def test_a_five_megabyte_name_is_echoed_bounded(served: Served) -> None:
    request = dataset_service_pb2.DescribeDatasetRequest(dataset="n" * 5_000_000)
    outcome = call(served, _method("DescribeDataset"), request.SerializeToString())
    assert outcome.code == grpc.StatusCode.NOT_FOUND, outcome
    assert "5000002 characters" in outcome.details, outcome  # the repr's length: the name and its quotes


def _method(name: str) -> Method:
    return next(m for m in METHODS if m.name == name)


def test_a_long_entry_name_in_a_transform_is_echoed_bounded(served: Served) -> None:
    spec = _fuzz.slice_spec(_fuzz._images())
    spec.transform.permute.permutation.extend([1, 0, 2])
    spec.transform.permute.entries.append("e" * 100_000)
    request = dataset_service_pb2.GetSamplesRequest(spec=spec, sample_indices=[0])
    outcome = call(served, _method("GetSamples"), request.SerializeToString())
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "spec.transform.permute" in outcome.details, outcome
    assert "(100002 characters)" in outcome.details and len(outcome.details) < 500, outcome


def test_a_long_patch_shape_is_echoed_bounded(served: Served) -> None:
    spec = _fuzz.slice_spec(_fuzz._images())
    spec.indexing_strategy.patch_wise.patch_shape.extend([-1] * 4_000)  # within --max-repeated
    request = dataset_service_pb2.OpenDatasourceRequest(spec=spec)
    outcome = call(served, _method("OpenDatasource"), request.SerializeToString())
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "patch_shape: sizes must be positive" in outcome.details and "characters)" in outcome.details, outcome
    assert len(outcome.details) < 500, outcome
    spec.indexing_strategy.patch_wise.patch_shape.extend([-1] * 96_000)
    outcome = call(
        served, _method("OpenDatasource"), dataset_service_pb2.OpenDatasourceRequest(spec=spec).SerializeToString()
    )
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert "--max-repeated" in outcome.details and len(outcome.details) < 500, outcome


def test_bounded_list_shows_a_few_items_and_counts_the_rest() -> None:
    assert bounded_list(["a", "b"]) == "'a', 'b'"
    assert bounded_list([f"s{i}" for i in range(1000)]) == "'s0', 's1', 's2', 's3', 's4' and 995 more"
    assert bounded_list(["T1", "T2"], quote=False) == "T1, T2"
    long = bounded_list(["x" * 10_000] * 3)
    assert long.count("(10002 characters)") == 3 and len(long) < 400


@pytest.mark.parametrize("window", [(0, 2**62), (5, -(2**63)), (2**63 - 1, None)])
def test_padded_extraction_of_a_window_outside_the_array_is_out_of_range(
    served: Served, window: tuple[int, int | None]
) -> None:
    extraction = spec_pb2.DirectExtraction(dataset="tiny", subject_index=0)
    extraction.extractor.pad_data.padding.add(before=1, after=2)
    extraction.extractor.pad_data.extractor.data.categories.append("labels")
    axis = extraction.index_expression.axes.add().range
    axis.start = window[0]
    if window[1] is not None:
        axis.stop = window[1]
    request = dataset_service_pb2.DirectExtractRequest(extraction=extraction)
    outcome = call(served, _method("DirectExtract"), request.SerializeToString())
    assert outcome.code == grpc.StatusCode.OUT_OF_RANGE, outcome
    assert "extraction.index_expression" in outcome.details, outcome
