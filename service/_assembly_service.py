"""AssemblyService: the gRPC face of :mod:`patchwire.service._assembly`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from patchwire.service._assembly import AssemblyStore, Job
from patchwire.service._encoding import encode_batch
from patchwire.service._errors import FailedPrecondition, Internal, InvalidArgument, translate_errors
from patchwire.service._export import export_subject
from patchwire.service._extraction import ImagePropertiesValue
from patchwire.service._requests import parse_request
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, codec, shared_memory

__all__ = ["AssemblyServicer"]

T = TypeVar("T")
MAX_STREAM_SEGMENTS = 4
MAX_RELEASED_LEASES = 1 << 16
"""Leases one ReleaseSharedFiles request may give back."""
"""Shared-memory segments a prediction stream keeps open; a client that moves on to a new segment is done with its
oldest."""


class AssemblyServicer(assembly_service_pb2_grpc.AssemblyServiceServicer):
    def __init__(self, store: AssemblyStore, executor: ThreadPoolExecutor, shared_memory: bool = True) -> None:
        self._store = store
        self._executor = executor
        self._shared_memory = shared_memory
        self._waiters: dict[str, asyncio.Future[None]] = {}

    def _open_segment(self, ref: apb.SharedMemory, for_posting: bool, field: str) -> shared_memory.OpenedSegment:
        if not self._shared_memory:
            raise FailedPrecondition(
                f"{field}: shared memory is off on this server (--no-shared-memory): send payloads on the wire"
            )
        try:
            return shared_memory.open_segment(ref, for_posting)
        except shared_memory.SegmentError as exc:
            raise FailedPrecondition(f"{field}: {exc}") from None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _notify(self, job_id: str) -> None:
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @translate_errors
    async def CreateJob(self, request: Any, context: Any) -> apb.CreateJobResponse:
        job = await self._run(self._store.create, request)
        return apb.CreateJobResponse(job=job.info())

    @translate_errors
    async def PostPredictions(self, request_iterator: Any, context: Any) -> AsyncIterator[apb.PostPredictionsResponse]:
        # The next batch is received while the current one is journalled and applied (a reading task feeds a queue of
        # one complete batch); batches are still posted one after another, in arrival order, each acknowledged only
        # once it is durable.
        batches: asyncio.Queue[tuple[Any, dict[str, list[Any]]] | BaseException | None] = asyncio.Queue(maxsize=1)

        segments = _StreamSegments(self._open_segment)

        async def receive() -> None:
            try:
                async for item in _received_batches(request_iterator, segments):
                    await batches.put(item)
                await batches.put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the responding side, which raises it as the call's status
                await batches.put(exc)

        reader = asyncio.ensure_future(receive())
        try:
            number = 0
            while (item := await batches.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                batch, arrays = item
                job = self._store.get(batch.job_id, "batch.job_id")
                result = await self._run(job.post, list(batch.sample_indices), arrays, batch.last_batch)
                self._notify(job.id)
                yield apb.PostPredictionsResponse(
                    batch_number=number,
                    accepted_samples=result.accepted,
                    duplicate_samples=result.duplicates,
                    ready_subjects=result.ready_subjects,
                    job=job.info(),
                )
                number += 1
        finally:
            reader.cancel()
            segments.close()

    @translate_errors
    async def SubscribeEvents(self, request: Any, context: Any) -> AsyncIterator[apb.SubscribeEventsResponse]:
        job = self._store.get(request.job_id)
        if request.from_sequence < 0:
            raise InvalidArgument(f"from_sequence: must not be negative, got {request.from_sequence}")
        sequence = max(int(request.from_sequence), 1)
        loop = asyncio.get_running_loop()

        def snapshot() -> tuple[int, int]:
            # under the job's lock: a job changes state and emits the matching event in one locked step, so a state
            # read here never runs ahead of the events (a job seen completed has its job_completed event)
            with job.lock:
                return job.state, len(job.events)

        while True:
            while sequence <= len(job.events):
                e = job.events[sequence - 1]
                yield apb.SubscribeEventsResponse(
                    event=apb.Event(
                        sequence=e.sequence,
                        type=e.type,
                        subject_index=e.subject_index,
                        subject=e.subject,
                        time_unix_ms=e.time_unix_ms,
                    )
                )
                sequence += 1
            if self._store.jobs.get(job.id) is not job:
                return
            state, _ = await self._run(snapshot)
            if sequence <= len(job.events):
                continue  # events arrived meanwhile (their notification may have found no waiter)
            if state != apb.JOB_STATE_ACTIVE:
                return
            waiter = self._waiters.get(job.id)
            if waiter is None or waiter.done():
                waiter = self._waiters[job.id] = loop.create_future()
            await asyncio.shield(waiter)

    @translate_errors
    async def GetJobStatus(self, request: Any, context: Any) -> apb.GetJobStatusResponse:
        job = self._store.get(request.job_id)
        if request.max_missing < 0:
            raise InvalidArgument(f"max_missing: must not be negative, got {request.max_missing}")

        def status() -> apb.GetJobStatusResponse:
            with job.lock:
                return apb.GetJobStatusResponse(job=job.info(), subjects=job.subject_status(request.max_missing))

        return await self._run(status)

    @translate_errors
    async def ListJobs(self, request: Any, context: Any) -> apb.ListJobsResponse:
        return apb.ListJobsResponse(jobs=[job.info() for job in list(self._store.jobs.values())])

    @translate_errors
    async def FetchSubject(self, request: Any, context: Any) -> AsyncIterator[apb.FetchSubjectResponse]:
        job = self._store.get(request.job_id)
        segment = (
            self._open_segment(request.shared_memory, False, "shared_memory")
            if request.HasField("shared_memory")
            else None
        )

        subject_index = int(request.subject_index)

        def encode() -> tuple[Any, apb.FetchSubjectResponse | None]:
            mappable = segment is not None and request.accept_files
            lent = job.lend_volume(subject_index) if mappable else None  # the server's memory, under leases
            files = job.result_files(subject_index) if mappable and lent is None else None
            arrays = files if files is not None else job.result(subject_index)
            sample: dict[str, Any] = dict(arrays)
            sample["properties"] = _properties(job, subject_index)
            encoded = encode_batch([sample])
            if segment is None:
                return encoded, None
            named = lent if lent is not None else None if files is None else _file_refs(files)
            if named is not None:
                return encoded, apb.FetchSubjectResponse(
                    batch=encoded.batch, shared_files=_shared_files(encoded, named)
                )
            sizes = [t.chunked_nbytes for t in codec.batch_tensors(encoded.batch) if t.chunked_nbytes]
            offsets, end = shared_memory.layout(sizes)
            if end > segment.size:  # does not fit: the wire carries it
                return encoded, None
            for offset, payload in zip(offsets, encoded.payloads, strict=True):
                segment.write(offset, payload if isinstance(payload, list) else [payload])
            return encoded, apb.FetchSubjectResponse(batch=encoded.batch, shared_offsets=offsets)

        try:
            encoded, shared = await self._run(encode)
        except shared_memory.SegmentError as exc:
            raise FailedPrecondition(f"shared_memory: {exc}") from None
        finally:
            if segment is not None:
                segment.close()
        if shared is not None:
            yield shared
            return
        for message in encoded.messages(apb.FetchSubjectResponse):
            yield message

    @translate_errors
    async def ProbeSharedMemory(self, request: Any, context: Any) -> apb.ProbeSharedMemoryResponse:
        segment = self._open_segment(request.shared_memory, request.for_posting, "shared_memory")
        segment.close()
        return apb.ProbeSharedMemoryResponse(size=segment.size)

    @translate_errors
    async def ReleaseSharedFiles(self, request: Any, context: Any) -> apb.ReleaseSharedFilesResponse:
        if len(request.leases) > MAX_RELEASED_LEASES:
            raise InvalidArgument(
                f"leases: at most {MAX_RELEASED_LEASES} per request, got {len(request.leases)}: send them in parts"
            )
        for k, lease in enumerate(request.leases):
            if not 1 <= len(lease) <= 64:
                raise InvalidArgument(f"leases[{k}]: a lease is 1 to 64 bytes, got {len(lease)}")
        released = await self._run(self._store.pool.give_back, list(request.leases))
        return apb.ReleaseSharedFilesResponse(released=released)

    @translate_errors
    async def ExportSubject(self, request: Any, context: Any) -> AsyncIterator[apb.ExportSubjectResponse]:
        job = self._store.get(request.job_id)
        name, data = await self._run(export_subject, job, int(request.subject_index), request.format, request.entry)
        yield apb.ExportSubjectResponse(file=apb.ExportedFile(file_name=name, size=len(data)))
        for piece in codec.chunks(data):
            yield apb.ExportSubjectResponse(data=piece)

    @translate_errors
    async def AbortJob(self, request: Any, context: Any) -> apb.AbortJobResponse:
        job = self._store.get(request.job_id)
        await self._run(job.abort)
        self._notify(job.id)
        return apb.AbortJobResponse(job=job.info())

    @translate_errors
    async def DeleteJob(self, request: Any, context: Any) -> apb.DeleteJobResponse:
        await self._run(self._store.delete, request.job_id)
        self._notify(request.job_id)
        return apb.DeleteJobResponse()


def _file_refs(files: dict[str, np.memmap]) -> dict[str, apb.SharedFile]:
    """Each entry's result or spilled buffer file, which never changes again."""
    out = {}
    for key, array in files.items():
        assert array.filename is not None
        st = os.stat(array.filename)
        out[key] = apb.SharedFile(path=str(array.filename), offset=array.offset, device=st.st_dev, inode=st.st_ino)
    return out


def _shared_files(encoded: Any, files: dict[str, apb.SharedFile]) -> list[apb.SharedFile]:
    """The file of each chunked tensor of a fetched subject, in announcement order (each entry is one stacked
    tensor of one sample)."""
    out = [
        files[field.key]
        for field in encoded.batch.fields
        if field.WhichOneof("value") == "stacked" and field.stacked.chunked_nbytes
    ]
    if len(out) != sum(1 for t in codec.batch_tensors(encoded.batch) if t.chunked_nbytes):
        raise Internal("a fetched subject's payloads do not all come from its result files")
    return out


def _properties(job: Job, subject_index: int) -> ImagePropertiesValue:
    return ImagePropertiesValue.from_geometry(job.source.dataset.require_geometry(subject_index))


class _StreamSegments:
    """The shared-memory segments a prediction stream posts from, opened on first use, at most
    MAX_STREAM_SEGMENTS."""

    def __init__(self, open_segment: Callable[[apb.SharedMemory, bool, str], shared_memory.OpenedSegment]) -> None:
        self._open = open_segment
        self._segments: dict[tuple[str, bytes], shared_memory.OpenedSegment] = {}

    def payloads(self, batch: apb.PredictionBatch) -> list[memoryview]:
        """The chunked payloads of a batch whose tensors lie in shared memory."""
        key = (batch.shared_memory.path, batch.shared_memory.token)
        segment = self._segments.pop(key, None)
        if segment is None:
            segment = self._open(batch.shared_memory, True, "batch.shared_memory")
            while len(self._segments) >= MAX_STREAM_SEGMENTS:
                self._segments.pop(next(iter(self._segments))).close()
        self._segments[key] = segment  # most recently used last
        try:
            sizes = [codec.announced_nbytes(t) for t in codec.batch_tensors(batch) if t.chunked_nbytes]
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

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()


async def _received_batches(
    request_iterator: Any, segments: _StreamSegments
) -> AsyncIterator[tuple[Any, dict[str, list[Any]]]]:
    """The complete prediction batches of a PostPredictions stream: (batch message, arrays by field)."""
    batch = None
    assembler: codec.ChunkAssembler | None = None
    async for raw in request_iterator:
        try:
            data = codec.chunk_data(raw) if isinstance(raw, bytes) else None
        except ValueError as exc:
            raise InvalidArgument(f"chunk: {exc}") from None
        if data is not None:  # a chunk, read straight from the wire bytes
            if assembler is None:
                raise InvalidArgument("chunk: a tensor chunk arrived before any batch announced it")
            try:
                assembler.add(data)
            except ValueError as exc:
                raise InvalidArgument(f"chunk: {exc}") from None
            request = None
        else:
            request = parse_request(apb.PostPredictionsRequest, raw) if isinstance(raw, bytes) else raw
        if request is None:
            pass
        elif request.WhichOneof("payload") == "batch":
            if assembler is not None and not assembler.complete:
                raise InvalidArgument("batch: a new batch arrived before the previous batch's tensor chunks")
            batch = request.batch
            if batch.HasField("shared_memory"):  # complete as it is: its payloads lie in the client's segment
                payloads: list[Any] = segments.payloads(batch)
                try:
                    arrays = codec.batch_arrays(batch, payloads)
                except (ValueError, TypeError) as exc:
                    raise InvalidArgument(f"batch.fields: {exc}") from None
                yield batch, arrays
                batch, assembler = None, None
                continue
            if batch.shared_offsets:
                raise InvalidArgument("batch.shared_offsets: given without batch.shared_memory")
            try:
                assembler = codec.ChunkAssembler(codec.batch_tensors(batch))
            except ValueError as exc:
                raise InvalidArgument(f"batch.fields: {exc}") from None
        elif request.WhichOneof("payload") == "chunk":
            if assembler is None:
                raise InvalidArgument("chunk: a tensor chunk arrived before any batch announced it")
            try:
                assembler.add(request.chunk.data)
            except ValueError as exc:
                raise InvalidArgument(f"chunk: {exc}") from None
        else:
            raise InvalidArgument("payload: neither batch nor chunk is set")
        if assembler is None or not assembler.complete or batch is None:
            continue
        try:
            arrays = codec.batch_arrays(batch, assembler.payloads())
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"batch.fields: {exc}") from None
        yield batch, arrays
        batch, assembler = None, None
    if assembler is not None:
        raise InvalidArgument("the stream ended in the middle of a batch's tensor chunks")
