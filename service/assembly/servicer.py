"""AssemblyService: the gRPC face of the assembly store; requests are read and responses built by :mod:`.protos`,
prediction streams taken in by :mod:`.intake`, finished volumes served by :mod:`.results`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from patchwire.service._auth import Identity, current_identity
from patchwire.service._calls import posted
from patchwire.service._codecs import OfferedCodecs
from patchwire.service._errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    bounded,
    translate_errors,
)
from patchwire.service._extraction import image_properties
from patchwire.service._shared_regions import Region, SharedRegions, named_region, write_payloads
from patchwire.service.assembly import protos, results
from patchwire.service.assembly.export import export_subject
from patchwire.service.assembly.intake import StreamSegments, received_batches
from patchwire.service.assembly.job import Job
from patchwire.service.assembly.store import AssemblyStore
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, tensor_pb2
from patchwire.wire import framing
from patchwire.wire.batches import encode_batch
from patchwire.wire.compression import RAW, Policy
from patchwire.wire.geometry import ImageProperties

__all__ = ["AssemblyServicer"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RELEASED_LEASES = 1 << 16
"""Leases one ReleaseSharedFiles request may give back."""


class AssemblyServicer(assembly_service_pb2_grpc.AssemblyServiceServicer):
    """``regions``: the registry of same-host clients' shared-memory segments (None: shared memory is off, and
    requests that name a region fail with FAILED_PRECONDITION). ``replica_id``: this server's, at the start of the
    job ids it chooses (:mod:`patchwire.wire.replicas`). ``offered``: the codecs fetched subjects may be compressed
    with."""

    def __init__(
        self,
        store: AssemblyStore,
        executor: ThreadPoolExecutor,
        regions: SharedRegions | None,
        replica_id: str,
        offered: OfferedCodecs | None = None,
    ) -> None:
        self._offered = offered if offered is not None else OfferedCodecs()
        self._store = store
        self._executor = executor
        self._regions = regions
        self._replica_id = replica_id
        self._waiters: dict[str, asyncio.Future[None]] = {}

    def _registry(self, field: str) -> SharedRegions:
        if self._regions is None:
            raise FailedPrecondition(
                f"{field}: shared memory is off on this server (--no-shared-memory): send payloads on the wire"
            )
        return self._regions

    def _region(self, ref: tensor_pb2.SharedMemory, identity: Identity, for_posting: bool, field: str) -> Region:
        return named_region(self._regions, ref.region, identity, for_posting, field)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _job(self, job_id: str, field: str = "job_id") -> Job:
        """The job ``job_id`` if the caller may use it: its owner or an administrator (PERMISSION_DENIED for anyone
        else; NOT_FOUND for an unknown id)."""
        job = self._store.get(job_id, field)
        if not current_identity().owns(job.owner):
            raise PermissionDenied(f"{field}: assembly job {bounded(job_id)} belongs to another identity")
        return job

    def _notify(self, job_id: str) -> None:
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @translate_errors
    async def CreateJob(self, request: Any, context: Any) -> apb.CreateJobResponse:
        job_id, spec, entries, mode = protos.create_arguments(request, self._replica_id)
        job = await self._run(self._store.create, job_id, spec, entries, mode, current_identity())
        return apb.CreateJobResponse(job=protos.job_info(job))

    @translate_errors
    async def PostPredictions(self, request_iterator: Any, context: Any) -> AsyncIterator[apb.PostPredictionsResponse]:
        # The next batch is received while the current one is journalled and applied (a reading task feeds a queue of
        # one complete batch); batches are still posted one after another, in arrival order, each acknowledged only
        # once it is durable.
        batches: asyncio.Queue[tuple[Any, dict[str, list[Any]]] | BaseException | None] = asyncio.Queue(maxsize=1)

        identity = current_identity()
        segments = StreamSegments(lambda ref, field: self._region(ref, identity, True, field))

        async def receive() -> None:
            try:
                async for item in received_batches(
                    request_iterator, segments, self._store.limits, self._job, offload=self._run
                ):
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
                job = self._job(batch.job_id, "batch.job_id")
                result = await self._run(job.post, list(batch.sample_indices), arrays, batch.last_batch)
                posted(len(batch.sample_indices), arrays)  # (metrics and the call's counters: what was received)
                self._notify(job.id)
                yield apb.PostPredictionsResponse(
                    batch_number=number,
                    accepted_samples=result.accepted,
                    duplicate_samples=result.duplicates,
                    ready_subjects=result.ready_subjects,
                    job=protos.job_info(job),
                )
                number += 1
        finally:
            reader.cancel()

    @translate_errors
    async def SubscribeEvents(self, request: Any, context: Any) -> AsyncIterator[apb.SubscribeEventsResponse]:
        job = self._job(request.job_id)
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
                yield apb.SubscribeEventsResponse(event=protos.event_message(job.events[sequence - 1]))
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
        job = self._job(request.job_id)
        if request.max_missing < 0:
            raise InvalidArgument(f"max_missing: must not be negative, got {request.max_missing}")

        def status() -> apb.GetJobStatusResponse:
            with job.lock:
                return apb.GetJobStatusResponse(
                    job=protos.job_info(job), subjects=protos.subject_statuses(job, request.max_missing)
                )

        return await self._run(status)

    @translate_errors
    async def ListJobs(self, request: Any, context: Any) -> apb.ListJobsResponse:
        identity = current_identity()
        return apb.ListJobsResponse(
            jobs=[protos.job_info(job) for job in list(self._store.jobs.values()) if identity.owns(job.owner)]
        )

    @translate_errors
    async def FetchSubject(self, request: Any, context: Any) -> AsyncIterator[apb.FetchSubjectResponse]:
        codec = self._offered.check(request.compression, "compression")
        job = self._job(request.job_id)
        region = (
            self._region(request.shared_memory, current_identity(), False, "shared_memory")
            if request.HasField("shared_memory")
            else None
        )
        segment = None if region is None else region.segment
        # on the wire only: a payload that shared memory carries crosses no link
        policy = Policy(codec, codec) if region is None else RAW

        subject_index = int(request.subject_index)

        def encode() -> tuple[Any, apb.FetchSubjectResponse | None]:
            mappable = region is not None and request.accept_files
            lent = results.lend_volume(job, subject_index) if mappable else None  # the server's memory, under leases
            files = results.result_files(job, subject_index) if mappable and lent is None else None
            # (offered at once: a descriptor not collected is closed with the region's connection)
            offered = None if region is None else _offer(self._registry("shared_memory"), region, lent, files)
            arrays = files if files is not None else results.result(job, subject_index)
            sample: dict[str, Any] = dict(arrays)
            sample["properties"] = _properties(job, subject_index)
            encoded = encode_batch([sample], compression=policy)
            if region is None or segment is None:
                return encoded, None
            if offered is not None:
                return encoded, apb.FetchSubjectResponse(
                    batch=encoded.batch, shared_files=_shared_files(encoded, offered)
                )
            written = write_payloads(segment, encoded.batch, encoded.payloads)
            if written is None:  # does not fit: the wire carries it
                return encoded, None
            return encoded, apb.FetchSubjectResponse(batch=encoded.batch, shared_offsets=written[0])

        encoded, shared = await self._run(encode)
        if shared is not None:
            yield shared
            return
        for message in encoded.messages(apb.FetchSubjectResponse):
            yield message

    @translate_errors
    async def RegisterSharedMemory(self, request: Any, context: Any) -> apb.RegisterSharedMemoryResponse:
        registry = self._registry("for_posting")
        return apb.RegisterSharedMemoryResponse(
            socket_path=registry.socket_path,
            ticket=registry.issue_ticket(current_identity(), bool(request.for_posting)),
            ticket_ttl_ms=int(registry.ticket_ttl_s * 1000),
            max_region_bytes=registry.max_region_bytes,
        )

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
        job = self._job(request.job_id)
        name, data = await self._run(export_subject, job, int(request.subject_index), request.format, request.entry)
        yield apb.ExportSubjectResponse(file=apb.ExportedFile(file_name=name, size=len(data)))
        for piece in framing.chunks(data):
            yield apb.ExportSubjectResponse(data=piece)

    @translate_errors
    async def AbortJob(self, request: Any, context: Any) -> apb.AbortJobResponse:
        job = self._job(request.job_id)
        await self._run(job.abort)
        _log.info("assembly job %s aborted by %s", job.id, current_identity().name)
        self._notify(job.id)
        return apb.AbortJobResponse(job=protos.job_info(job))

    @translate_errors
    async def DeleteJob(self, request: Any, context: Any) -> apb.DeleteJobResponse:
        self._job(request.job_id)
        await self._run(self._store.delete, request.job_id)
        _log.info("assembly job %s deleted by %s", request.job_id, current_identity().name)
        self._notify(request.job_id)
        return apb.DeleteJobResponse()


def _offer(
    registry: SharedRegions,
    region: Region,
    lent: dict[str, tuple[int, bytes]] | None,
    files: dict[str, np.memmap] | None,
) -> dict[str, apb.SharedFile] | None:
    """Offers the descriptors of a fetched volume to the connection of the region the fetch named: the server's
    memfds (``lent``: read-only descriptors and their leases) or each entry's result or spilled buffer file, which
    never changes again, opened read-only by the server itself. None where neither is at hand."""
    out = {}
    if lent is not None:
        for key, (fd, lease) in lent.items():
            out[key] = apb.SharedFile(offset=0, lease=registry.offer_as(region, lease, fd), lent_memory=True)
        return out
    if files is None:
        return None
    for key, array in files.items():
        assert array.filename is not None
        fd = os.open(array.filename, os.O_RDONLY | os.O_CLOEXEC)
        out[key] = apb.SharedFile(offset=array.offset, lease=registry.offer(region, fd))
    return out


def _shared_files(encoded: Any, files: dict[str, apb.SharedFile]) -> list[apb.SharedFile]:
    """The file of each chunked tensor of a fetched subject, in announcement order (each entry is one stacked
    tensor of one sample)."""
    out = [
        files[field.key]
        for field in encoded.batch.fields
        if field.WhichOneof("value") == "stacked" and field.stacked.chunked_nbytes
    ]
    if len(out) != sum(1 for t in framing.batch_tensors(encoded.batch) if t.chunked_nbytes):
        raise Internal("a fetched subject's payloads do not all come from its result files")
    return out


def _properties(job: Job, subject_index: int) -> ImageProperties:
    return image_properties(job.source.dataset.require_geometry(subject_index))
