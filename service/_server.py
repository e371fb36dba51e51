"""The gRPC server: DatasetService plus the standard health and reflection services, on ``grpc.aio``."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from patchwire.service._assembly import AssemblyStore
from patchwire.service._assembly_service import AssemblyServicer
from patchwire.service._cache import BlockCache
from patchwire.service._catalog import Dataset
from patchwire.service._datasource import CompiledDatasource, DatasourceCache, direct_extract
from patchwire.service._encoding import Encoded, encode_batch, properties_to_proto
from patchwire.service._errors import InvalidArgument, translate_errors
from patchwire.service._extraction import ImagePropertiesValue
from patchwire.service._requests import parsed
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import codec, dataset_service_pb2, dataset_service_pb2_grpc

__all__ = ["DatasetServicer", "PatchwireServer", "ServerConfig"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name
ASSEMBLY_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AssemblyService"].full_name

#: Most samples in one message (bounds per-message overhead and latency for tiny samples such as voxels).
MAX_SAMPLES_PER_MESSAGE = 4096


@dataclass(frozen=True)
class ServerConfig:
    """How a patchwire server runs."""

    datasets: Mapping[str, Path]
    """Dataset name -> pymia-format HDF5 file."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 50051
    """Port to bind; 0 picks a free one (see PatchwireServer.port)."""
    workers: int = 4
    """Threads that read and transform samples (h5py serialises reads; numpy work runs in parallel)."""
    grace_seconds: float = 5.0
    """How long stop() lets running calls finish."""
    options: Sequence[tuple[str, Any]] = field(default_factory=codec.channel_options)
    """gRPC server options; the message-size limits are set deliberately on both ends."""
    state_dir: Path | None = None
    """Where assembly jobs live (journals, partial volumes, results); a restart with the same folder recovers them.
    None: a temporary folder removed at stop (jobs are then not durable across restarts)."""
    cache_bytes: int = 1 << 30
    """Capacity of the block cache shared by all datasets and clients (0 disables it)."""
    assembly_memory_bytes: int = 1 << 30
    """Most bytes of assembly buffers in memory (see ``_assembly.BufferPool``); the rest are spilled to files."""
    shared_memory: bool = True
    """Let assembly clients on this host, running as this server's user, post and fetch predictions through
    shared-memory segments instead of the wire (:mod:`patchwire.v1.shared_memory`)."""


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(
        self, datasets: Mapping[str, Dataset], executor: ThreadPoolExecutor, cache: DatasourceCache | None = None
    ) -> None:
        self._datasets = datasets
        self._cache = cache if cache is not None else DatasourceCache(datasets)
        self._executor = executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @translate_errors
    async def ListDatasets(self, request: Any, context: Any) -> dataset_service_pb2.ListDatasetsResponse:
        return dataset_service_pb2.ListDatasetsResponse(
            datasets=[
                dataset_service_pb2.DatasetSummary(name=name, subject_count=len(ds.subjects), categories=ds.categories)
                for name, ds in self._datasets.items()
            ]
        )

    @translate_errors
    async def DescribeDataset(self, request: Any, context: Any) -> dataset_service_pb2.DescribeDatasetResponse:
        ds = self._cache.dataset(request.dataset)
        return await self._run(_describe, ds)

    @translate_errors
    async def OpenDatasource(self, request: Any, context: Any) -> dataset_service_pb2.OpenDatasourceResponse:
        src = await self._run(self._cache.get, request.spec)
        return dataset_service_pb2.OpenDatasourceResponse(
            length=src.length,
            subjects=[
                dataset_service_pb2.SubjectSamples(subject_index=s, first_sample_index=start, sample_count=count)
                for s, start, count in zip(src.subject_indices, src.starts, src.counts, strict=True)
            ],
        )

    @translate_errors
    async def GetSamples(self, request: Any, context: Any) -> AsyncIterator[dataset_service_pb2.GetSamplesResponse]:
        compression = _compression(request.integer_compression)
        src = await self._run(self._cache.get, request.spec)
        indices = [int(i) for i in request.sample_indices]
        for i in indices:
            src.locate(i)
        async for message in self._stream(
            src, indices, 1, dataset_service_pb2.GetSamplesResponse, compression=compression
        ):
            yield message

    @translate_errors
    async def DirectExtract(self, request: Any, context: Any) -> AsyncIterator[Any]:
        ds = self._cache.dataset(request.extraction.dataset, "extraction.dataset")
        encoded = await self._run(lambda: encode_batch([direct_extract(ds, request.extraction)]))
        for message in encoded.messages(dataset_service_pb2.DirectExtractResponse):
            yield message

    @translate_errors
    async def StreamBatches(self, request: Any, context: Any) -> AsyncIterator[Any]:
        shard_count = request.shard_count or 1
        if request.batch_size <= 0:
            raise InvalidArgument(f"batch_size: must be positive, got {request.batch_size}")
        if shard_count < 0:
            raise InvalidArgument(f"shard_count: must be positive, got {shard_count}")
        if not 0 <= request.shard_index < shard_count:
            raise InvalidArgument(f"shard_index: {request.shard_index} must be in [0, shard_count={shard_count})")
        if request.start_position < 0:
            raise InvalidArgument(f"start_position: must not be negative, got {request.start_position}")
        compression = _compression(request.integer_compression)
        src = await self._run(self._cache.get, request.spec)
        if src.extractor is None:
            raise InvalidArgument("spec.extractor: streaming samples needs an extractor")
        order = src.order(request.shuffle, request.seed, request.epoch)[request.shard_index :: shard_count]
        if request.drop_last:
            order = order[: len(order) - len(order) % request.batch_size]
        order = order[request.start_position :]
        async for message in self._stream(
            src,
            order.tolist(),
            request.batch_size,
            dataset_service_pb2.StreamBatchesResponse,
            first_position=request.start_position,
            compression=compression,
        ):
            yield message

    async def _stream(
        self,
        src: CompiledDatasource,
        indices: list[int],
        batch_size: int,
        response_type: Any,
        first_position: int = 0,
        compression: int = codec.Compression.COMPRESSION_UNSPECIFIED,
    ) -> AsyncIterator[Any]:
        """Sends ``indices`` in messages of whole batches sized towards TARGET_MESSAGE_BYTES, one message ahead."""

        def build(start: int, count: int) -> Encoded:
            chunk = indices[start : start + count]
            return encode_batch([src.sample(i) for i in chunk], chunk, first_position + start, compression)

        start, per_message = 0, batch_size  # the first message holds one batch: a short time to first batch
        pending = asyncio.ensure_future(self._run(build, start, per_message)) if indices else None
        try:
            while pending is not None:
                encoded = await pending
                count = len(encoded.batch.sample_indices)
                start += count
                pending = None
                if start < len(indices):
                    per_sample = max(encoded.nbytes / max(count, 1), 1.0)
                    batches = max(1, math.floor(codec.TARGET_MESSAGE_BYTES / (per_sample * batch_size)))
                    per_message = min(batches * batch_size, max(MAX_SAMPLES_PER_MESSAGE, batch_size))
                    pending = asyncio.ensure_future(self._run(build, start, per_message))
                # chunk messages are made one at a time as gRPC takes them: a batch's payload is not held twice
                for message in encoded.messages(response_type):
                    yield message
        finally:
            if pending is not None:
                pending.cancel()


def _identity(data: bytes) -> bytes:
    return data


def _compression(value: int) -> int:
    if value not in codec.Compression.values():
        known = ", ".join(codec.Compression.keys())
        raise InvalidArgument(f"integer_compression: unknown codec {value} (this server knows {known})")
    return value


def _handlers(servicer: Any, service_name: str) -> grpc.GenericRpcHandler:
    """The servicer's methods as gRPC handlers whose responses may be pre-serialised bytes (see
    ``codec.passthrough_serializer``) and whose requests arrive as bytes, parsed by the handler (``_requests.parsed``:
    INVALID_ARGUMENT for bytes that do not parse): like the generated ``add_*Servicer_to_server`` otherwise."""
    service = descriptor_pool.Default().FindServiceByName(service_name)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        m.name: make[(m.client_streaming, m.server_streaming)](
            # requests arrive as wire bytes: bytes that do not parse get INVALID_ARGUMENT (not gRPC's UNKNOWN), and
            # streamed chunk messages are read without protobuf's copy
            getattr(servicer, m.name) if m.client_streaming else parsed(getattr(servicer, m.name), m),
            request_deserializer=_identity,
            response_serializer=codec.passthrough_serializer,
        )
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service_name, handlers)


def _describe(ds: Dataset) -> dataset_service_pb2.DescribeDatasetResponse:
    out = dataset_service_pb2.DescribeDatasetResponse(name=ds.name)
    for cat in ds.categories:
        out.categories.add(name=cat, entry_names=ds.entry_names.get(cat, []))
    for s, name in enumerate(ds.subjects):
        subject = out.subjects.add(index=s, name=name)
        for cat, shape, dtype, is_string in ds.array_info(s):
            info = subject.arrays.add(category=cat, shape=shape, is_string=is_string)
            if not is_string:
                info.dtype = codec.dtype_to_proto(dtype)
        if ds.geometry is not None:
            subject.image_properties.CopyFrom(properties_to_proto(ImagePropertiesValue.from_geometry(ds.geometry[s])))
    return out


class PatchwireServer:
    """A running patchwire server. ``async with PatchwireServer(config) as server: ...`` or start()/stop()."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._executor: ThreadPoolExecutor | None = None
        self._datasets: dict[str, Dataset] = {}
        self._assembly: AssemblyStore | None = None
        self.cache: BlockCache | None = None
        self._temp_state: Path | None = None
        self.port: int | None = None

    async def start(self) -> PatchwireServer:
        cfg = self.config
        try:
            self.cache = BlockCache(cfg.cache_bytes)
            for name, path in cfg.datasets.items():
                self._datasets[name] = Dataset(name, path, self.cache)
            self._executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="patchwire-read")
            cache = DatasourceCache(self._datasets)
            state_dir = cfg.state_dir
            if state_dir is None:
                self._temp_state = state_dir = Path(tempfile.mkdtemp(prefix="patchwire-state-"))
                _log.warning(
                    "no state folder given: assembly jobs live in %s, unjournalled, and are lost at stop", state_dir
                )
            # without a state folder nothing outlives the server: journalling and syncing would protect nothing
            self._assembly = AssemblyStore(
                Path(state_dir),
                cache.get,
                cfg.assembly_memory_bytes,
                durable=cfg.state_dir is not None,
                share_volumes=cfg.shared_memory,
            )
            await asyncio.get_running_loop().run_in_executor(self._executor, self._assembly.load)
            server = grpc.aio.server(options=list(cfg.options))
            server.add_generic_rpc_handlers(
                (
                    _handlers(DatasetServicer(self._datasets, self._executor, cache), SERVICE_NAME),
                    _handlers(
                        AssemblyServicer(self._assembly, self._executor, cfg.shared_memory), ASSEMBLY_SERVICE_NAME
                    ),
                )
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, ASSEMBLY_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
            await server.start()
        except BaseException:  # a dataset that does not open, a port that is taken: free what was opened
            self._release()
            raise
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        _log.info("patchwire serving %s on %s:%s", ", ".join(self._datasets) or "no datasets", cfg.host, self.port)
        return self

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME, ASSEMBLY_SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Flips health to NOT_SERVING, lets running calls finish for ``grace`` seconds, frees everything.
        Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(self.config.grace_seconds if grace is None else grace)
        self._release()
        _log.info("patchwire server stopped")

    def _release(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._assembly is not None:
            self._assembly.close()  # volumes of ready subjects being written: finish them (their journals stay)
            for job in self._assembly.jobs.values():
                for subject in job.subjects.values():
                    self._assembly.pool.release(subject, spill=False)  # rebuilt from their journals
            self._assembly = None
        for ds in self._datasets.values():
            ds.close()
        self._datasets = {}
        if self._temp_state is not None:
            shutil.rmtree(self._temp_state, ignore_errors=True)
            self._temp_state = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def __aenter__(self) -> PatchwireServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
