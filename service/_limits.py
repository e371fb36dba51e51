"""Limits on everything a request can make the server grow: calls, jobs, disk, bytes, samples and specs.

Every limit is a field of :class:`Limits` (a ``ServerConfig`` field; ``patchwire serve`` has a flag per limit). A
request over a limit is refused with RESOURCE_EXHAUSTED (:class:`ResourceExhausted`) whose message names the limit,
its value and the flag that raises it; a request that is malformed rather than large (announced sizes that do not
match what arrives) is INVALID_ARGUMENT. Checks run before the memory or disk they protect is committed:

- :class:`CallLimiter` counts the calls and streams open per identity and in total, in one wrapper around every
  handler (:meth:`CallLimiter.guard`);
- :func:`check_spec` walks a datasource spec before it is compiled: nesting depth, repeated fields, subject subsets,
  and the target shapes of SizeCorrection, Reshape and PadDataExtractor against the largest sample;
- :class:`DiskQuota` accounts for the bytes of each job's state folder (journals, results, spilled buffers) before
  they are written, per job and in total.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from patchwire.service._auth import ANONYMOUS, current_identity
from patchwire.service._errors import InvalidArgument, ResourceExhausted, bounded
from patchwire.service._metrics import metrics
from patchwire.wire import compression, framing, tensors

__all__ = [
    "CallLimiter",
    "DiskQuota",
    "Limits",
    "check_announced",
    "check_sample_bytes",
    "check_spec",
    "exhausted",
]

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """The server's limits. Each has a ``patchwire serve`` flag, named in the RESOURCE_EXHAUSTED message of a
    request that exceeds it."""

    max_calls_per_identity: int = 64
    """Calls and streams one identity may have open at once (--max-calls-per-identity)."""
    max_calls: int = 256
    """Calls and streams open at once, all identities together (--max-calls)."""
    max_jobs_per_identity: int = 32
    """Assembly jobs one identity may hold (created and not deleted; --max-jobs-per-identity)."""
    max_jobs: int = 256
    """Assembly jobs on the server, all identities together (--max-jobs)."""
    max_job_disk_bytes: int = 32 * _GiB
    """Bytes one job may keep in the state folder: journals, results and spilled buffers (--max-job-disk-mb)."""
    max_disk_bytes: int = 128 * _GiB
    """Bytes all jobs together may keep in the state folder (--max-disk-mb)."""
    max_post_bytes: int = 1 * _GiB
    """Bytes one prediction batch may announce (chunked payloads, and every tensor's shape x dtype;
    --max-post-mb)."""
    max_sample_bytes: int = 1 * _GiB
    """Bytes of one sample after its transforms (checked from the spec where it can be, and before encoding;
    --max-sample-mb)."""
    max_batch_size: int = 1 << 16
    """Samples in one StreamBatches batch (--max-batch-size)."""
    max_batch_bytes: int = 2 * _GiB
    """Bytes of the samples of one batch or message the server builds (--max-batch-mb)."""
    max_indices: int = 1 << 16
    """Sample indices in one GetSamples request (--max-indices)."""
    max_subjects: int = 1 << 16
    """Subjects in a datasource's subject subset (--max-subjects)."""
    max_epoch_samples: int = 1 << 24
    """Samples a StreamBatches request may name (sample_subset, sample_weights) or draw beyond the datasource's own
    length (samples_per_epoch; --max-epoch-samples)."""
    max_spec_depth: int = 16
    """Nesting depth of a spec (a ComposeExtractor or ComposeTransform inside another counts one level;
    --max-spec-depth)."""
    max_repeated: int = 4096
    """Values in any other repeated field of a spec (categories, entries, label changes, axes; --max-repeated)."""


def exhausted(what: str, limit: int | float, flag: str, unit: str = "") -> ResourceExhausted:
    """The RESOURCE_EXHAUSTED error of ``what`` over a limit: names the limit and the flag that raises it. Counted as a
    refused request under the flag's name (``patchwire_refused_requests_total{limit="max-calls"}``): every caller
    raises it."""
    metrics().refused.labels(flag.lstrip("-")).inc()
    return ResourceExhausted(f"{what}: over the server's limit of {limit:g}{unit} ({flag} raises it)")


# -- calls and streams ------------------------------------------------------------------------------------------------


class CallLimiter:
    """Counts the calls and streams each identity has open; :meth:`guard` wraps a handler so that it is refused
    with RESOURCE_EXHAUSTED beyond the limits. The identity is :func:`current_identity` when the call starts."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._open: Counter[str] = Counter()
        self.total = 0
        """Calls open now (all identities)."""

    def open_calls(self, name: str) -> int:
        """Calls ``name`` has open now."""
        return self._open[name]

    def _enter(self) -> str:
        # runs on the event loop only: no lock needed
        identity = current_identity()
        name = identity.name
        lim = self.limits
        # without authentication every caller is ANONYMOUS: only the total limit applies
        if identity is not ANONYMOUS and self._open[name] >= lim.max_calls_per_identity:
            raise exhausted(
                f"concurrent calls: {bounded(name)} already has {self._open[name]} calls or streams open",
                lim.max_calls_per_identity,
                "--max-calls-per-identity",
            )
        if self.total >= lim.max_calls:
            raise exhausted(
                f"concurrent calls: the server already has {self.total} calls or streams open",
                lim.max_calls,
                "--max-calls",
            )
        self._open[name] += 1
        self.total += 1
        return name

    def _exit(self, name: str) -> None:
        self.total -= 1
        self._open[name] -= 1
        if not self._open[name]:
            del self._open[name]

    def guard(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler`` (a bound servicer method: unary coroutine or streaming async generator), counted."""
        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    name = self._enter()
                except ResourceExhausted as exc:
                    await context.abort(exc.code, str(exc))
                try:
                    async for item in handler(request, context):
                        yield item
                finally:
                    self._exit(name)

            return stream

        @functools.wraps(handler)
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                name = self._enter()
            except ResourceExhausted as exc:
                await context.abort(exc.code, str(exc))
            try:
                return await handler(request, context)
            finally:
                self._exit(name)

        return unary


# -- specs ------------------------------------------------------------------------------------------------------------

_COMPOSE = {"ComposeExtractor", "ComposeTransform"}


def check_spec(msg: Message, limits: Limits, field: str = "spec") -> None:
    """Refuses a spec (a DatasourceSpec, DirectExtraction or any part) that would make the server grow beyond
    ``limits`` before anything is compiled or read: nesting deeper than ``max_spec_depth``, repeated fields longer
    than ``max_repeated`` (``max_subjects`` for a subject subset), and target shapes of SizeCorrection, Reshape and
    PadDataExtractor whose samples would exceed ``max_sample_bytes`` even at one byte per voxel."""
    _walk(msg, limits, field, 0)


def _walk(msg: Message, limits: Limits, where: str, depth: int) -> None:
    name = msg.DESCRIPTOR.name
    if name in _COMPOSE:
        depth += 1
        if depth > limits.max_spec_depth:
            raise exhausted(f"{where}: specs nested too deep", limits.max_spec_depth, "--max-spec-depth", " levels")
    _check_shapes(msg, name, limits, where)
    for fd, value in msg.ListFields():
        path = f"{where}.{fd.name}"
        if fd.is_repeated:
            most, flag = (
                (limits.max_subjects, "--max-subjects")
                if name == "StringList" and where.endswith("subject_subset")
                else (limits.max_repeated, "--max-repeated")
            )
            if len(value) > most:
                raise exhausted(f"{path}: {len(value)} values", most, flag, " values")
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                for k, item in enumerate(value):
                    _walk(item, limits, f"{path}[{k}]", depth)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            _walk(value, limits, path, depth)


def _product(values: Iterable[int]) -> int:
    return math.prod(max(int(v), 1) for v in values)


_MALFORMED_SIZE = 1 << 16
"""Sizes and paddings beyond this (or negative) are malformed: the compilers refuse them with INVALID_ARGUMENT
(``_transforms.MAX_SIZE``, ``_extraction.MAX_PADDING``), so they are left to them here."""


def _check_shapes(msg: Any, name: str, limits: Limits, where: str) -> None:
    if name == "SizeCorrection" and any(d.HasField("size") and not 0 <= d.size <= _MALFORMED_SIZE for d in msg.shape):
        return
    if name == "PadDataExtractor" and any(
        not (0 <= p.before <= _MALFORMED_SIZE and 0 <= p.after <= _MALFORMED_SIZE) for p in msg.padding
    ):
        return
    if name == "SizeCorrection":
        voxels = _product(d.size for d in msg.shape if d.HasField("size"))
        what = f"{where}.shape: a target shape of {voxels} voxels"
    elif name == "ReshapeEntry":
        voxels = _product(msg.shape)
        what = f"{where}.shape: a shape of {voxels} voxels"
    elif name == "PadDataExtractor":
        voxels = _product(1 + max(p.before, 0) + max(p.after, 0) for p in msg.padding)
        what = f"{where}.padding: a padded sample of at least {voxels} voxels"
    else:
        return
    if voxels > limits.max_sample_bytes:
        raise exhausted(f"{what} (at least {voxels} bytes)", limits.max_sample_bytes / _MiB, "--max-sample-mb", " MB")


def check_sample_bytes(nbytes: int, max_sample_bytes: int, where: str = "sample") -> None:
    """Refuses a sample (or an entry of one, before it is made) of ``nbytes`` over ``max_sample_bytes``."""
    if nbytes > max_sample_bytes:
        raise exhausted(f"{where}: {nbytes} bytes", max_sample_bytes / _MiB, "--max-sample-mb", " MB")


# -- disk -------------------------------------------------------------------------------------------------------------


class DiskQuota:
    """Bytes each assembly job keeps in the state folder, charged before they are written and refunded when they
    are deleted; thread-safe."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._used: Counter[str] = Counter()
        self.total = 0
        """Bytes charged now, all jobs together."""

    def used(self, job_id: str) -> int:
        return self._used[job_id]

    def charge(self, job_id: str, nbytes: int, what: str) -> None:
        """Charges ``nbytes`` to ``job_id``, or raises RESOURCE_EXHAUSTED (charging nothing) when they would take the
        job or the server over its quota."""
        if nbytes <= 0:
            return
        lim = self.limits
        with self._lock:
            if self._used[job_id] + nbytes > lim.max_job_disk_bytes:
                raise exhausted(
                    f"disk: {what} needs {nbytes} bytes more in the state folder, job {bounded(job_id)} holds "
                    f"{self._used[job_id]}",
                    lim.max_job_disk_bytes / _MiB,
                    "--max-job-disk-mb",
                    " MB per job",
                )
            if self.total + nbytes > lim.max_disk_bytes:
                raise exhausted(
                    f"disk: {what} needs {nbytes} bytes more in the state folder, all jobs hold {self.total}",
                    lim.max_disk_bytes / _MiB,
                    "--max-disk-mb",
                    " MB",
                )
            self._used[job_id] += nbytes
            self.total += nbytes

    def force(self, job_id: str, nbytes: int) -> None:
        """Charges bytes already on disk (found on recovery), whatever the quota."""
        with self._lock:
            self._used[job_id] += nbytes
            self.total += nbytes

    def refund(self, job_id: str, nbytes: int) -> None:
        with self._lock:
            nbytes = min(nbytes, self._used[job_id])
            self._used[job_id] -= nbytes
            self.total -= nbytes

    def drop(self, job_id: str) -> None:
        """Refunds everything of a deleted job."""
        with self._lock:
            self.total -= self._used.pop(job_id, 0)


# -- posted predictions -----------------------------------------------------------------------------------------------


def check_announced(batch: Any, limits: Limits) -> None:
    """Checks what a prediction batch announces before anything is allocated for it: every tensor's dtype and
    shape, a chunked payload size that matches its shape x dtype exactly (uncompressed) or within its codec's bound
    (compressed: ``compression.max_compressed_bytes``), and at most ``max_post_bytes`` in all (RESOURCE_EXHAUSTED)
    and ``max_indices`` samples."""
    if len(batch.sample_indices) > limits.max_indices:
        raise exhausted(
            f"batch.sample_indices: {len(batch.sample_indices)} samples in one batch",
            limits.max_indices,
            "--max-indices",
        )
    raw_total = wire_total = 0
    for k, tensor in enumerate(framing.batch_tensors(batch)):
        try:
            dtype = tensors.dtype_from_proto(tensor.dtype)
        except ValueError as exc:
            raise InvalidArgument(f"batch.fields: {exc} (tensor {k})") from None
        if any(d < 0 for d in tensor.shape):
            raise InvalidArgument(f"batch.fields: tensor {k} has a negative size in its shape {bounded(tensor.shape)}")
        raw = math.prod(int(d) for d in tensor.shape) * dtype.itemsize
        raw_total += raw
        if tensor.chunked_nbytes:
            wire = int(tensor.chunked_nbytes)
            if tensor.compression == compression.Compression.COMPRESSION_UNSPECIFIED and wire != raw:
                raise InvalidArgument(
                    f"batch.fields: tensor of shape {bounded(tuple(tensor.shape))} and dtype {dtype} needs {raw} "
                    f"bytes, but announces {wire} (tensor {k})"
                )
            if wire < 0 or wire > compression.max_compressed_bytes(raw, tensor.compression):  # the codec's worst case
                raise InvalidArgument(
                    f"batch.fields: tensor {k} announces {wire} compressed bytes for {raw} bytes of shape and dtype"
                )
            wire_total += wire
        if max(raw_total, wire_total) > limits.max_post_bytes:
            raise exhausted(
                f"batch.fields: a prediction batch announcing over {max(raw_total, wire_total)} bytes",
                limits.max_post_bytes / _MiB,
                "--max-post-mb",
                " MB",
            )
