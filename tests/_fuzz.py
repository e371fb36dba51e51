"""Hostile requests for every method of DatasetService and AssemblyService, built from the message descriptors.

Three sources, all reproducible from a seed: raw bytes; messages with every kind of field filled with extreme values
(ints at 0, -1, 2^31, 2^62, -2^63; long strings; huge repeated fields; unknown enum values; unset and set oneofs),
field names steering strings towards names the server knows so that requests get past the first check; and valid
requests mutated at the byte level or merged with such a message. :func:`send` calls a method with wire bytes (no
client-side serialisation, so anything can be sent) and returns the status.

Long because it builds requests for every field kind of every message of both services from their descriptors.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import dataset_service_pb2, server_service_pb2, spec_pb2, tensor_pb2
from patchwire.wire import framing, tensors

FD = descriptor.FieldDescriptor

#: Statuses a request may get; anything else (UNKNOWN, INTERNAL, DEADLINE_EXCEEDED, ...) is a finding.
DOCUMENTED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)

LIVE_JOB = "live"  # an active job: predictions may be posted to it
DONE_JOB = "done"  # a completed job: its subjects can be fetched and exported, its events end
SHAPE = (20, 24, 16)  # every subject of the tiny dataset
SUBJECTS = 3


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    input: descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def __repr__(self) -> str:
        return self.name


def methods() -> list[Method]:
    out = []
    for file in (dataset_service_pb2.DESCRIPTOR, apb.DESCRIPTOR, server_service_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for m in service.methods:
                out.append(Method(service.full_name, m.name, m.input_type, m.client_streaming, m.server_streaming))
    return out


METHODS = methods()


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float


class Counter:
    """Requests sent (thread-safe)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


SENT = Counter()
MAX_RESPONSES = 64
"""Response messages read before a stream is cancelled."""


def send(channel: grpc.Channel, method: Method, request: bytes | Sequence[bytes], timeout: float) -> Outcome:
    """Calls ``method`` with wire bytes (one message, or the messages of a client stream) and reads the whole
    response; returns its status."""
    import time

    started = time.monotonic()
    SENT.add()
    try:
        if method.client_streaming:
            messages = [request] if isinstance(request, bytes) else list(request)
            call = channel.stream_stream(method.path)  # no serializers: bytes travel as they are
            for _ in call(iter(messages), timeout=timeout):
                pass
        elif method.server_streaming:
            assert isinstance(request, bytes)
            stream = channel.unary_stream(method.path)(request, timeout=timeout)
            for count, _ in enumerate(stream):
                if count >= MAX_RESPONSES:  # a valid request for much data: served, which is all this checks
                    stream.cancel()
                    break
        else:
            assert isinstance(request, bytes)
            channel.unary_unary(method.path)(request, timeout=timeout)
    except grpc.RpcError as exc:
        error: Any = exc
        if error.code() == grpc.StatusCode.CANCELLED and error.details() == "Locally cancelled by application!":
            return Outcome(grpc.StatusCode.OK, "", time.monotonic() - started)
        return Outcome(error.code(), error.details() or "", time.monotonic() - started)
    return Outcome(grpc.StatusCode.OK, "", time.monotonic() - started)


# -- values -----------------------------------------------------------------------------------------------------------

INT64_EXTREMES = [0, 1, -1, 2, 3, 7, 16, 17, 60, 2**31 - 1, 2**31, -(2**31), 2**32, 2**40, 2**62, 2**63 - 1, -(2**63)]
INT32_EXTREMES = [0, 1, -1, 2, 3, 4, 16, 60, 2**31 - 1, -(2**31)]
UINT64_EXTREMES = [0, 1, 2, 2**32, 2**63, 2**64 - 1]
UINT32_EXTREMES = [0, 1, 2, 2**31, 2**32 - 1]
DOUBLES = [0.0, -0.0, 1.0, -1.0, 0.5, 50.0, 99.9, 100.0, 101.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
LONG = "x" * 100_000
STRINGS = ["", "a", "nope", "..", "../x", "é\u0000☃", "A" * 200, LONG]
#: Names the server knows, by field name: a request that names them reaches past the lookup into deeper code.
KNOWN = {
    "dataset": ["tiny"],
    "job_id": [LIVE_JOB, DONE_JOB],
    "category": ["images", "labels", "mask"],
    "categories": ["images", "labels", "mask"],
    "values": ["Subject_1", "Subject_2", "T1", "T2", "GT"],
    "entries": ["images", "labels", "T1"],
    "entry": ["prediction", "images"],
    "mask_key": ["mask", "labels"],
    "key": ["prediction"],
    "name": ["prediction", "p"],
    "path": ["/proc/self/fd/0", "/proc/1/fd/3", "/dev/zero", "/proc/99999999/fd/1"],
}


class Generator:
    """Messages of any type with extreme field values, from a seeded ``random.Random``."""

    def __init__(self, rng: random.Random, max_depth: int = 6, huge: float = 0.01, method: str = "") -> None:
        self.rng = rng
        # the jobs the fuzzing posts to and fetches from stay: aborting and deleting name others
        self.known = {**KNOWN, "job_id": ["fresh", "nope"]} if method in ("AbortJob", "DeleteJob") else KNOWN
        self.max_depth = max_depth
        self.huge = huge

    def message(self, desc: descriptor.Descriptor, depth: int = 0) -> Message:
        msg = message_factory.GetMessageClass(desc)()
        self.fill(msg, depth)
        return msg

    def fill(self, msg: Message, depth: int) -> None:
        rng = self.rng
        desc = msg.DESCRIPTOR
        chosen_oneofs = {o.name: rng.choice([None, *o.fields]) for o in desc.oneofs if not o.name.startswith("_")}
        for f in desc.fields:
            oneof = f.containing_oneof
            if oneof is not None and not oneof.name.startswith("_"):
                if chosen_oneofs[oneof.name] is not f:
                    continue
            elif rng.random() < (0.1 if f.name in KNOWN else 0.35):
                continue  # leave unset
            if f.is_repeated:
                self._repeated(msg, f, depth)
            elif f.type == FD.TYPE_MESSAGE:
                if depth >= self.max_depth:
                    if oneof is not None:
                        getattr(msg, f.name).SetInParent()
                    continue
                getattr(msg, f.name).CopyFrom(self.message(f.message_type, depth + 1))
            else:
                setattr(msg, f.name, self.scalar(f))

    def _repeated(self, msg: Message, f: FD, depth: int) -> None:
        rng = self.rng
        target = getattr(msg, f.name)
        if f.type == FD.TYPE_MESSAGE:
            if depth >= self.max_depth:
                return
            if rng.random() < self.huge:  # many (shallow) messages
                for _ in range(2000):
                    target.add()
                return
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                target.add().CopyFrom(self.message(f.message_type, depth + 1))
            return
        if rng.random() < self.huge:
            value = self.scalar(f)
            if isinstance(value, str | bytes):
                target.extend([value[:8]] * 20_000)
            else:
                target.extend([value] * 200_000)
            return
        target.extend(self.scalar(f) for _ in range(rng.choice([0, 1, 1, 2, 3, 4])))

    def scalar(self, f: FD) -> Any:
        rng = self.rng
        t = f.type
        small = rng.random() < 0.5
        if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
            return rng.randrange(-2, 25) if small else rng.choice(INT64_EXTREMES)
        if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            return rng.randrange(-2, 5) if small else rng.choice(INT32_EXTREMES)
        if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return rng.randrange(0, 25) if small else rng.choice(UINT64_EXTREMES)
        if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return rng.randrange(0, 25) if small else rng.choice(UINT32_EXTREMES)
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return rng.choice(DOUBLES)
        if t == FD.TYPE_BOOL:
            return rng.random() < 0.5
        if t == FD.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            return rng.choice(known) if rng.random() < 0.8 else rng.choice([-1, 99, 2**31 - 1, -(2**31)])
        if t == FD.TYPE_STRING:
            names = self.known.get(f.name)
            if names and rng.random() < 0.75:
                return rng.choice(names)
            return rng.choice(STRINGS)
        if t == FD.TYPE_BYTES:
            return rng.choice([b"", rng.randbytes(16), rng.randbytes(rng.randrange(1, 80)), b"\xff" * 100_000])
        raise AssertionError(f"unhandled field type {t}")


# -- valid requests ---------------------------------------------------------------------------------------------------


def _images() -> spec_pb2.Extractor:
    return spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"]))


def slice_spec(extractor: spec_pb2.Extractor | None = None) -> spec_pb2.DatasourceSpec:
    spec = spec_pb2.DatasourceSpec(dataset="tiny")
    spec.indexing_strategy.slice.slice_axis.append(0)
    if extractor is not None:
        spec.extractor.CopyFrom(extractor)
    return spec


def _rich_specs() -> list[spec_pb2.DatasourceSpec]:
    """Valid specs that use many extractors and transforms."""
    out = [slice_spec(_images())]
    patches = spec_pb2.DatasourceSpec(dataset="tiny", extractor=_images())
    patches.indexing_strategy.patch_wise.patch_shape.extend([8, 8, 8])
    patches.indexing_strategy.patch_wise.stride.extend([4, 8, 8])
    patches.transform.compose.transforms.add().intensity_normalization.loop_axis = 2
    patches.transform.compose.transforms.add().permute.permutation.extend([3, 0, 1, 2])
    patches.transform.compose.transforms[1].permute.entries.append("images")
    patches.transform.compose.transforms[0].intensity_normalization.entries.append("images")
    out.append(patches)
    composed = slice_spec()
    ex = composed.extractor.compose.extractors
    ex.add().pad_data.CopyFrom(spec_pb2.PadDataExtractor(padding=[spec_pb2.Padding(before=2, after=3)]))
    ex[0].pad_data.extractor.data.categories.append("labels")
    ex.add().random_data.CopyFrom(spec_pb2.RandomDataExtractor(category="images", seed=3))
    ex.add().names.categories.append("images")
    ex.add().subject.SetInParent()
    ex.add().indexing.SetInParent()
    ex.add().image_properties.SetInParent()
    ex.add().image_property_shape.numpy_format = True
    ex.add().selective_data.CopyFrom(
        spec_pb2.SelectiveDataExtractor(category="images", selection=spec_pb2.StringList(values=["T2"]))
    )
    t = composed.transform.compose.transforms
    t.add().clip_percentile.CopyFrom(
        spec_pb2.ClipPercentile(upper_percentile={"float_value": 95.0}, lower_percentile={"int_value": 5})
    )
    t[0].clip_percentile.entries.append("images")
    t.add().relabel.label_changes.add(new_label={"int_value": 9}, old_label={"int_value": 1})
    t[1].relabel.entries.append("labels")
    t.add().size_correction.shape.add(size=20)
    t[2].size_correction.shape.add()
    t[2].size_correction.entries.append("labels")
    t.add().mask.CopyFrom(spec_pb2.Mask(mask_key="labels", mask_value={"int_value": 0}, entries=["labels"]))
    t.add().un_squeeze.CopyFrom(spec_pb2.UnSqueeze(axis=0, entries=["labels"]))
    t.add().squeeze.CopyFrom(spec_pb2.Squeeze(entries=["labels"], squeeze_axis=[0]))
    t.add().reshape.shapes.add(entry="labels", shape=[-1])
    t.add().intensity_rescale.CopyFrom(
        spec_pb2.IntensityRescale(lower={"int_value": 0}, upper={"float_value": 1.0}, entries=["images"])
    )
    composed.subject_subset.values.extend(["Subject_1", "Subject_2"])
    out.append(composed)
    voxels = spec_pb2.DatasourceSpec(dataset="tiny", extractor=_images())
    voxels.indexing_strategy.voxel_wise.image_dimension = 3
    out.append(voxels)
    out.append(_sampled_spec())
    return out


def _sampled_spec() -> spec_pb2.DatasourceSpec:
    """Label-balanced random patches with an augmentation chain."""
    sampled = spec_pb2.DatasourceSpec(
        dataset="tiny", extractor=spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images", "labels"]))
    )
    sampling = sampled.indexing_strategy.patch_sampling
    sampling.patch_shape.extend([8, 8, 8])
    sampling.samples_per_volume = 3
    sampling.label.probabilities.add(label=0, probability=0.5)
    sampling.label.probabilities.add(label=1, probability=0.5)
    chain = sampled.transform.compose.transforms
    chain.add().random_flip.CopyFrom(spec_pb2.RandomFlip(entries=["images", "labels"]))
    chain.add().random_affine.CopyFrom(
        spec_pb2.RandomAffine(degrees=[spec_pb2.Range(low=-10, high=10)], entries=["images", "labels"])
    )
    chain.add().random_noise.CopyFrom(spec_pb2.RandomNoise(std=spec_pb2.Range(low=0, high=1), entries=["images"]))
    return sampled


def prediction_batch(job_id: str, indices: Sequence[int], value: float = 1.0, chunked: bool = False) -> list[bytes]:
    """The wire messages of a valid post of slice predictions (shape (24, 16, 1) each) to ``job_id``."""
    arrays = [np.full((*SHAPE[1:], 1), value + i, dtype=np.float32) for i in indices]
    tensor, parts = tensors.stacked_to_tensor(arrays, inline_bytes=0 if chunked else 1 << 30)
    batch = apb.PredictionBatch(job_id=job_id, sample_indices=list(indices))
    batch.fields.add(key="prediction", stacked=tensor)
    out = [apb.PostPredictionsRequest(batch=batch).SerializeToString()]
    if parts is not None:
        out.extend(framing.serialized_chunks(parts, chunk_bytes=4096))
    return out


def create_job_request(job_id: str) -> apb.CreateJobRequest:
    return apb.CreateJobRequest(
        spec=slice_spec(),
        entries=[apb.OutputEntry(name="prediction", channels=1, dtype=tensors.DataType.DATA_TYPE_FLOAT32)],
        overlap_mode=apb.OVERLAP_MODE_OVERWRITE,
        job_id=job_id,
    )


def valid_requests() -> dict[str, list[bytes | list[bytes]]]:
    """Requests each method accepts (or refuses for a reason of state), the seeds of mutation."""
    specs = _rich_specs()
    d, a = dataset_service_pb2, apb
    direct = spec_pb2.DirectExtraction(dataset="tiny", extractor=_images(), subject_index=1)
    direct.index_expression.axes.add(index=3)
    direct.index_expression.axes.add().range.SetInParent()
    direct.index_expression.axes.add().range.stop = 5
    msgs: dict[str, list[Message]] = {
        "ListDatasets": [d.ListDatasetsRequest()],
        "DescribeDataset": [d.DescribeDatasetRequest(dataset="tiny")],
        "OpenDatasource": [d.OpenDatasourceRequest(spec=s) for s in specs],
        "GetSamples": [d.GetSamplesRequest(spec=s, sample_indices=[0, -1, 5]) for s in specs]
        + [d.GetSamplesRequest(spec=specs[0], sample_indices=[1], integer_compression=1)]
        + [d.GetSamplesRequest(spec=specs[0], sample_indices=[1, 4], compression=c) for c in (2, 3)],
        "DirectExtract": [d.DirectExtractRequest(extraction=direct)],
        "StreamBatches": [
            d.StreamBatchesRequest(spec=specs[0], batch_size=7, shuffle=True, seed=5, shard_count=2, shard_index=1),
            d.StreamBatchesRequest(spec=specs[1], batch_size=3, start_position=10, drop_last=True),
            d.StreamBatchesRequest(spec=specs[0], batch_size=5, shuffle=True, seed=2, compression=2),
            d.StreamBatchesRequest(
                spec=specs[0],
                batch_size=4,
                sample_subset=[5, 1, 9, 30],
                sample_weights=[1.0, 0.5, 0.0, 2.0],
                samples_per_epoch=12,
                subjects_per_window=1,
                shard_balance=d.SHARD_BALANCE_PAD,
                shard_count=2,
                global_start=2,
                batch_shard_count=2,
                batch_shard_index=1,
            ),
            d.StreamBatchesRequest(spec=_sampled_spec(), batch_size=2, shuffle=True, seed=3, epoch=1),
        ],
        "SelectIndices": [
            d.SelectIndicesRequest(
                spec=specs[0],
                selection=spec_pb2.Selection(
                    compose=spec_pb2.ComposeSelection(
                        strategies=[
                            spec_pb2.Selection(non_black=spec_pb2.NonBlackSelection(black_value=0.5)),
                            spec_pb2.Selection(subject=spec_pb2.SubjectSelection(subjects=["Subject_1"])),
                        ]
                    )
                ),
            )
        ],
        "CreateJob": [create_job_request("fresh")],
        "SubscribeEvents": [a.SubscribeEventsRequest(job_id=DONE_JOB, from_sequence=2)],
        "GetJobStatus": [a.GetJobStatusRequest(job_id=LIVE_JOB, max_missing=3)],
        "ListJobs": [a.ListJobsRequest()],
        "FetchSubject": [
            a.FetchSubjectRequest(job_id=DONE_JOB, subject_index=1),
            a.FetchSubjectRequest(job_id=DONE_JOB, subject_index=0, compression=tensor_pb2.COMPRESSION_SHUFFLE_LZ4),
        ],
        "ExportSubject": [
            a.ExportSubjectRequest(job_id=DONE_JOB, subject_index=s, format=f)
            for s, f in ((0, a.EXPORT_FORMAT_NIFTI), (1, a.EXPORT_FORMAT_MHA), (2, a.EXPORT_FORMAT_HDF5))
        ],
        "AbortJob": [a.AbortJobRequest(job_id="nope")],
        "DeleteJob": [a.DeleteJobRequest(job_id="nope")],
        "RegisterSharedMemory": [a.RegisterSharedMemoryRequest(for_posting=True)],
        "ReleaseSharedFiles": [a.ReleaseSharedFilesRequest(leases=[b"x" * 16])],
        "GetServerInfo": [server_service_pb2.GetServerInfoRequest()],
        "ListStreams": [server_service_pb2.ListStreamsRequest()],
    }
    out: dict[str, list[bytes | list[bytes]]] = {k: [m.SerializeToString() for m in v] for k, v in msgs.items()}
    out["PostPredictions"] = [prediction_batch(LIVE_JOB, [3, 4]), prediction_batch(LIVE_JOB, [7], chunked=True)]
    assert set(out) == {m.name for m in METHODS}
    return out


# -- mutations --------------------------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level edits: flips, truncation, deletion, insertion, duplication."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        n = len(buf)
        if kind == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif kind == 1 and n:
            buf[rng.randrange(n)] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        elif kind == 2:
            del buf[rng.randrange(n + 1) :]
        elif kind == 3 and n:
            start = rng.randrange(n)
            del buf[start : start + rng.randint(1, 8)]
        elif kind == 4:
            at = rng.randrange(n + 1)
            buf[at:at] = rng.randbytes(rng.randint(1, 10))
        elif n:
            start = rng.randrange(n)
            buf[start:start] = buf[start : start + rng.randint(1, 16)]
    return bytes(buf)


def merge_extremes(data: bytes, desc: descriptor.Descriptor, gen: Generator) -> bytes:
    """A valid request with some fields overwritten by extreme ones (protobuf's merge of two messages)."""
    msg = message_factory.GetMessageClass(desc).FromString(data)
    msg.MergeFrom(gen.message(desc, depth=gen.max_depth - 2))
    return msg.SerializeToString()


def nested(desc_kind: str, depth: int, dataset: str = "tiny") -> spec_pb2.DatasourceSpec:
    """A spec whose extractor or transform is a ComposeExtractor / ComposeTransform nested ``depth`` deep."""
    spec = slice_spec(_images())
    if desc_kind == "extractor":
        inner: Any = spec.extractor
        for _ in range(depth):
            inner = inner.compose.extractors.add()
        inner.data.categories.append("images")
    else:
        inner = spec.transform
        for _ in range(depth):
            inner = inner.compose.transforms.add()
        inner.squeeze.entries.append("images")
    return spec


def raw_nested_extractor(depth: int) -> bytes:
    """A DatasourceSpec field 3 (extractor) of Extractors nested ``depth`` deep through field 11 (compose) and
    ComposeExtractor field 1, written by hand (protobuf refuses to serialise beyond its recursion limit)."""
    inner = b""
    for _ in range(depth):
        compose = b"\x0a" + framing.varint(len(inner)) + inner  # ComposeExtractor.extractors[0]
        inner = b"\x5a" + framing.varint(len(compose)) + compose  # Extractor.compose (field 11)
    spec = b"\x0a\x04tiny" + b"\x1a" + framing.varint(len(inner)) + inner
    return b"\x0a" + framing.varint(len(spec)) + spec  # OpenDatasourceRequest.spec / GetSamplesRequest.spec


def pool(rng: random.Random, count: int, seeds: dict[str, list[bytes | list[bytes]]]) -> list[tuple[Method, Any]]:
    """``count`` requests over every method: a quarter raw bytes, a quarter extreme messages, half mutated valid
    requests (byte edits and merges)."""
    out: list[tuple[Method, Any]] = []
    for k in range(count):
        method = METHODS[k % len(METHODS)]
        gen = Generator(rng, method=method.name)
        kind = rng.randrange(4)
        request: Any
        if kind == 0:
            request = rng.randbytes(rng.choice([0, 1, 2, 5, 20, 200, 3000]))
        elif kind == 1:
            request = gen.message(method.input).SerializeToString()
        else:
            seed = rng.choice(seeds[method.name])
            messages = [seed] if isinstance(seed, bytes) else list(seed)
            at = rng.randrange(len(messages))
            if kind == 2:
                messages[at] = mutate_bytes(messages[at], rng)
            else:
                try:
                    messages[at] = merge_extremes(messages[at], method.input, gen)
                except Exception:  # a raw chunk message parses as a request with unknown fields: edit its bytes
                    messages[at] = mutate_bytes(messages[at], rng)
            request = messages if method.client_streaming else messages[0]
        if method.client_streaming and isinstance(request, bytes):
            request = [request] * rng.choice([1, 1, 2])
        out.append((method, request))
    return out


Check = Callable[[Method, Any, Outcome], None]
