"""AssemblyService: the gRPC face of :mod:`patchwire.service._assembly`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from patchwire.service._assembly import AssemblyStore, Job
from patchwire.service._encoding import encode_batch
from patchwire.service._errors import InvalidArgument, translate_errors
from patchwire.service._export import export_subject
from patchwire.service._extraction import ImagePropertiesValue
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, codec

__all__ = ["AssemblyServicer"]

T = TypeVar("T")


class AssemblyServicer(assembly_service_pb2_grpc.AssemblyServiceServicer):
    def __init__(self, store: AssemblyStore, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        self._waiters: dict[str, asyncio.Future[None]] = {}

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

        async def receive() -> None:
            try:
                async for item in _received_batches(request_iterator):
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

        def encode() -> Any:
            sample: dict[str, Any] = {name: arr for name, arr in job.result(int(request.subject_index)).items()}
            sample["properties"] = _properties(job, int(request.subject_index))
            return encode_batch([sample])

        encoded = await self._run(encode)
        for message in encoded.messages(apb.FetchSubjectResponse):
            yield message

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


def _properties(job: Job, subject_index: int) -> ImagePropertiesValue:
    return ImagePropertiesValue.from_geometry(job.source.dataset.require_geometry(subject_index))


async def _received_batches(request_iterator: Any) -> AsyncIterator[tuple[Any, dict[str, list[Any]]]]:
    """The complete prediction batches of a PostPredictions stream: (batch message, arrays by field)."""
    batch = None
    assembler: codec.ChunkAssembler | None = None
    async for raw in request_iterator:
        data = codec.chunk_data(raw) if isinstance(raw, bytes) else None
        if data is not None:  # a chunk, read straight from the wire bytes
            if assembler is None:
                raise InvalidArgument("chunk: a tensor chunk arrived before any batch announced it")
            try:
                assembler.add(data)
            except ValueError as exc:
                raise InvalidArgument(f"chunk: {exc}") from None
            request = None
        else:
            try:
                request = apb.PostPredictionsRequest.FromString(raw) if isinstance(raw, bytes) else raw
            except DecodeError:
                raise InvalidArgument("payload: not a PostPredictionsRequest message") from None
        if request is None:
            pass
        elif request.WhichOneof("payload") == "batch":
            if assembler is not None and not assembler.complete:
                raise InvalidArgument("batch: a new batch arrived before the previous batch's tensor chunks")
            batch = request.batch
            assembler = codec.ChunkAssembler(codec.batch_tensors(batch))
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
