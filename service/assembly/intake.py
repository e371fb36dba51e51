"""The intake of a PostPredictions stream: its messages read into complete prediction batches, each admitted
(its job the caller's, its announced sizes within the limits) before anything it announces is allocated or read,
with payloads on the wire or in a registered shared-memory region."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from patchwire.service._errors import InvalidArgument
from patchwire.service._limits import Limits, check_announced
from patchwire.service._requests import parse_request
from patchwire.service._shared_regions import Region
from patchwire.service.assembly.job import Job
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import tensor_pb2
from patchwire.wire import framing, shared_memory, tensors
from patchwire.wire.batches import batch_arrays
from patchwire.wire.framing import BatchReader, FramingError

__all__ = ["StreamSegments", "received_batches"]

Offload = Callable[..., Awaitable[Any]]
"""Runs ``fn(*args)`` off the event loop (the server's executor) and returns its result."""


class StreamSegments:
    """The registered regions a prediction stream posts from, looked up (and their owner checked) for each batch."""

    def __init__(self, region: Callable[[tensor_pb2.SharedMemory, str], Region]) -> None:
        self._region = region

    def payloads(self, batch: apb.PredictionBatch) -> list[memoryview]:
        """The chunked payloads of a batch whose tensors lie in shared memory (views that stay valid while they
        live, even if the region is unregistered meanwhile)."""
        segment = self._region(batch.shared_memory, "batch.shared_memory").segment
        try:
            sizes = [tensors.announced_nbytes(t) for t in framing.batch_tensors(batch) if t.chunked_nbytes]
        except ValueError as exc:
            raise InvalidArgument(f"batch.fields: {exc}") from None
        if len(sizes) != len(batch.shared_offsets):
            raise InvalidArgument(
                f"batch.shared_offsets: {len(batch.shared_offsets)} offsets for {len(sizes)} chunked tensors"
            )
        try:
            return [
                segment.read(offset, size, f"batch.shared_offsets[{k}]")
                for k, (offset, size) in enumerate(zip(batch.shared_offsets, sizes, strict=True))
            ]
        except shared_memory.SegmentError as exc:
            raise InvalidArgument(str(exc)) from None


async def received_batches(
    request_iterator: Any,
    segments: StreamSegments,
    limits: Limits,
    job_of: Callable[[str, str], Job],
    offload: Offload | None = None,
) -> AsyncIterator[tuple[Any, dict[str, list[Any]]]]:
    """The complete prediction batches of a PostPredictions stream: (batch message, arrays by field). Before
    anything a batch announces is allocated or read, its job must exist and be the caller's (``job_of``) and its
    announced sizes must lie within ``limits`` (``check_announced``). Compressed predictions are decompressed
    through ``offload`` (off the event loop) where given: chunks of blosc2 frames as they arrive, batches with
    compressed inline tensors when they are complete."""

    def admit(batch: apb.PredictionBatch) -> list[memoryview] | None:
        job_of(batch.job_id, "batch.job_id")  # NOT_FOUND or PERMISSION_DENIED before a byte is allocated for it
        check_announced(batch, limits)
        if batch.HasField("shared_memory"):  # complete as it is: its payloads lie in the client's segment
            return segments.payloads(batch)
        if batch.shared_offsets:
            raise InvalidArgument("batch.shared_offsets: given without batch.shared_memory")
        return None

    reader = BatchReader(
        lambda raw: parse_request(apb.PostPredictionsRequest, raw), max_bytes=limits.max_post_bytes, admit=admit
    )
    try:
        async for raw in request_iterator:
            complete = await offload(reader.feed, raw) if offload is not None and reader.decoding else reader.feed(raw)
            if complete is None:
                continue
            batch, payloads = complete
            try:
                if offload is not None and any(t.compression for t in framing.batch_tensors(batch)):
                    arrays = await offload(batch_arrays, batch, payloads)
                else:
                    arrays = batch_arrays(batch, payloads)
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(f"batch.fields: {exc}") from None
            yield batch, arrays
        reader.finish()
    except FramingError as exc:
        raise InvalidArgument(str(exc)) from None
