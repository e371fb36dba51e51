"""The gRPC server: DatasetService plus the standard health and reflection services, on ``grpc.aio``."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from patchwire.service._auth import Authenticator, ReflectionGate, guarded, load_auth_config
from patchwire.service._cache import BlockCache
from patchwire.service._catalog import Dataset
from patchwire.service._datasource import CompiledDatasource, DatasourceCache, direct_extract
from patchwire.service._errors import FailedPrecondition, InvalidArgument, translate_errors
from patchwire.service._extraction import image_properties
from patchwire.service._limits import CallLimiter, Limits, check_sample_bytes, check_spec, exhausted
from patchwire.service._requests import parsed
from patchwire.service._served import ServedDataset
from patchwire.service._shared_regions import SharedRegions
from patchwire.service._shared_socket import SharedMemorySocket
from patchwire.service._tls import exposed_without_tls, server_credentials
from patchwire.service.assembly import AssemblyServicer, AssemblyStore
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc
from patchwire.wire import compression, framing, shared_memory, tensors
from patchwire.wire.batches import Encoded, encode_batch

__all__ = ["DatasetServicer", "PatchwireServer", "ServerConfig", "dataset_health_name"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name
ASSEMBLY_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AssemblyService"].full_name


def dataset_health_name(dataset: str) -> str:
    """The health service name of one dataset: SERVING while the server serves it, NOT_SERVING while it cannot."""
    return f"{SERVICE_NAME}/{dataset}"


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
    options: Sequence[tuple[str, Any]] = field(default_factory=framing.channel_options)
    """gRPC server options; the message-size limits are set deliberately on both ends."""
    state_dir: Path | None = None
    """Where assembly jobs live (journals, partial volumes, results); a restart with the same folder recovers them.
    None: a temporary folder removed at stop (jobs are then not durable across restarts)."""
    cache_bytes: int = 1 << 30
    """Capacity of the block cache shared by all datasets and clients (0 disables it)."""
    assembly_memory_bytes: int = 1 << 30
    """Most bytes of assembly buffers in memory (see ``assembly.MemoryPool``); the rest are spilled to files."""
    shared_memory: bool = True
    """Let assembly clients on this host, running as this server's user, post and fetch predictions through
    shared-memory segments instead of the wire: they hand their descriptors over the server's Unix socket
    (:mod:`patchwire.wire.shared_memory`). False: no socket, registration fails with FAILED_PRECONDITION."""
    shared_memory_uids: tuple[int, ...] | None = None
    """User ids whose processes may share memory with this server (None: only the server's own)."""
    shared_memory_dir: Path | None = None
    """Where the server makes its private socket folder (None: the system's temporary folder). A client in a
    container needs this folder mounted at the same path."""
    tls_cert: Path | None = None
    """PEM certificate chain the server presents; with ``tls_key``, the port speaks TLS only. None: plaintext."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA certificate(s) client certificates must chain to: with it every client must present one (mutual
    TLS), and the certificate's subject can identify the caller (see ``auth_config``)."""
    auth_config: Path | None = None
    """TOML file of identities, their roles and credentials (``patchwire.service._auth``): every call of
    DatasetService and AssemblyService then needs a known bearer token or client certificate. None: no
    authentication, every caller is ``anonymous`` with every role."""
    limits: Limits = field(default_factory=Limits)
    """What one request, identity or job may make the server hold (:mod:`patchwire.service._limits`)."""
    verify: bool = False
    """Take a CRC-32 of every stored block of every dataset's arrays at open (reading each file once) and check every
    block read from disk against it before it is cached or served; a mismatch stops serving that dataset
    (:mod:`patchwire.service._integrity`)."""


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(
        self,
        datasets: Mapping[str, ServedDataset],
        executor: ThreadPoolExecutor,
        cache: DatasourceCache | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._datasets = datasets
        self._limits = limits if limits is not None else Limits()
        self._cache = cache if cache is not None else DatasourceCache(datasets, limits=self._limits)
        self._executor = executor
        self.samples_built = 0
        """Samples read and transformed for GetSamples and StreamBatches so far (how much work calls cost)."""

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @translate_errors
    async def ListDatasets(self, request: Any, context: Any) -> dataset_service_pb2.ListDatasetsResponse:
        return await self._run(_summaries, self._datasets)

    @translate_errors
    async def DescribeDataset(self, request: Any, context: Any) -> dataset_service_pb2.DescribeDatasetResponse:
        ds = self._cache.dataset(request.dataset)
        return await self._run(self._cache.consistent, ds, lambda: _describe(ds))

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
        if len(request.sample_indices) > self._limits.max_indices:
            raise exhausted(
                f"sample_indices: {len(request.sample_indices)} indices in one request",
                self._limits.max_indices,
                "--max-indices",
            )
        src = await self._run(self._cache.get, request.spec)

        def validated() -> list[int]:  # in the executor: the loop never walks a request's indices
            indices = [int(i) for i in request.sample_indices]
            for i in indices:
                src.locate(i)
            return indices

        indices = await self._run(validated)
        async for message in self._stream(
            src, indices, 1, dataset_service_pb2.GetSamplesResponse, compression=compression
        ):
            yield message

    @translate_errors
    async def DirectExtract(self, request: Any, context: Any) -> AsyncIterator[Any]:
        ds = self._cache.dataset(request.extraction.dataset, "extraction.dataset")
        check_spec(request.extraction, self._limits, "extraction")

        def extract() -> Encoded:
            sample = direct_extract(ds, request.extraction, self._limits.max_sample_bytes)
            check_sample_bytes(_sample_bytes(sample), self._limits.max_sample_bytes)
            return encode_batch([sample])

        encoded = await self._run(self._cache.consistent, ds, extract)
        for message in encoded.messages(dataset_service_pb2.DirectExtractResponse):
            yield message

    @translate_errors
    async def StreamBatches(self, request: Any, context: Any) -> AsyncIterator[Any]:
        shard_count = request.shard_count or 1
        if request.batch_size <= 0:
            raise InvalidArgument(f"batch_size: must be positive, got {request.batch_size}")
        if request.batch_size > self._limits.max_batch_size:
            raise exhausted(
                f"batch_size: {request.batch_size} samples", self._limits.max_batch_size, "--max-batch-size"
            )
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

        def ordered() -> range | np.ndarray:  # in the executor; a range (never a list) when nothing is shuffled
            order = src.order(request.shuffle, request.seed, request.epoch)[request.shard_index :: shard_count]
            if request.drop_last:
                order = order[: len(order) - len(order) % request.batch_size]
            return order[request.start_position :]

        async for message in self._stream(
            src,
            await self._run(ordered),
            request.batch_size,
            dataset_service_pb2.StreamBatchesResponse,
            first_position=request.start_position,
            compression=compression,
        ):
            yield message

    async def _stream(
        self,
        src: CompiledDatasource,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        response_type: Any,
        first_position: int = 0,
        compression: int = compression.Compression.COMPRESSION_UNSPECIFIED,
    ) -> AsyncIterator[Any]:
        """Sends ``indices`` in messages of whole batches sized towards TARGET_MESSAGE_BYTES, one message ahead.
        Messages are built in the executor, which stops within one sample once the call ends (``stopped``); a
        sample over ``max_sample_bytes`` or a message over ``max_batch_bytes`` ends the call with
        RESOURCE_EXHAUSTED."""
        stopped = threading.Event()
        limits = self._limits

        def build(start: int, count: int) -> Encoded | None:
            chunk = [int(i) for i in indices[start : start + count]]

            def built() -> Encoded | None:
                samples, nbytes = [], 0
                for i in chunk:
                    if stopped.is_set():
                        return None
                    sample = src.sample(i)
                    self.samples_built += 1
                    size = _sample_bytes(sample)
                    check_sample_bytes(size, limits.max_sample_bytes, f"sample {i}")
                    nbytes += size
                    if nbytes > limits.max_batch_bytes:
                        raise exhausted(
                            f"batch: samples from position {first_position + start} hold over {nbytes} bytes",
                            limits.max_batch_bytes / (1 << 20),
                            "--max-batch-mb",
                            " MB",
                        )
                    samples.append(sample)
                return encode_batch(samples, chunk, first_position + start, compression)

            # the file is checked before and after: nothing read across a change is sent
            return self._cache.consistent(src.dataset, built)

        start, per_message = 0, batch_size  # the first message holds one batch: a short time to first batch
        pending = asyncio.ensure_future(self._run(build, start, per_message)) if len(indices) else None
        try:
            while pending is not None:
                encoded = await pending
                assert encoded is not None  # (None only once stopped)
                count = len(encoded.batch.sample_indices)
                start += count
                pending = None
                if start < len(indices):
                    per_sample = max(encoded.nbytes / max(count, 1), 1.0)
                    batches = max(1, math.floor(framing.TARGET_MESSAGE_BYTES / (per_sample * batch_size)))
                    per_message = min(batches * batch_size, max(MAX_SAMPLES_PER_MESSAGE, batch_size))
                    pending = asyncio.ensure_future(self._run(build, start, per_message))
                # chunk messages are made one at a time as gRPC takes them: a batch's payload is not held twice
                for message in encoded.messages(response_type):
                    yield message
        finally:
            stopped.set()
            if pending is not None:
                pending.cancel()


def _sample_bytes(sample: Mapping[str, Any]) -> int:
    """The array bytes of a sample (what its encoding grows with)."""
    return sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray | np.generic))


def _identity(data: bytes) -> bytes:
    return data


def _compression(value: int) -> int:
    if value not in compression.Compression.values():
        known = ", ".join(compression.Compression.keys())
        raise InvalidArgument(f"integer_compression: unknown codec {value} (this server knows {known})")
    return value


def _limited(handler: Callable[..., Any], limiter: CallLimiter | None) -> Callable[..., Any]:
    return handler if limiter is None else limiter.guard(handler)


def _handlers(
    servicer: Any, service_name: str, auth: Authenticator | None = None, limiter: CallLimiter | None = None
) -> grpc.GenericRpcHandler:
    """The servicer's methods as gRPC handlers whose responses may be pre-serialised bytes (see
    ``framing.passthrough_serializer``) and whose requests arrive as bytes, parsed by the handler (``_requests.parsed``:
    INVALID_ARGUMENT for bytes that do not parse): like the generated ``add_*Servicer_to_server`` otherwise.
    With ``auth`` each method first passes the authentication and role gate (``_auth.guarded``), then, with
    ``limiter``, the limits on concurrent calls (``_limits.CallLimiter``), which count by the identity the gate set;
    only then is a request parsed."""
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
            guarded(
                _limited(
                    getattr(servicer, m.name) if m.client_streaming else parsed(getattr(servicer, m.name), m), limiter
                ),
                f"/{service_name}/{m.name}",
                auth,
            ),
            request_deserializer=_identity,
            response_serializer=framing.passthrough_serializer,
        )
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service_name, handlers)


def _summaries(datasets: Mapping[str, ServedDataset]) -> dataset_service_pb2.ListDatasetsResponse:
    out = dataset_service_pb2.ListDatasetsResponse()
    for name, served in datasets.items():
        served.refresh()  # a file that changed is opened again (or found unusable) before it is listed
        try:
            ds = served.current()
        except FailedPrecondition:
            out.datasets.add(name=name, unavailable=True, unavailable_reason=served.public_reason or "unavailable")
            continue
        out.datasets.add(name=name, subject_count=len(ds.subjects), categories=ds.categories)
    return out


def _describe(ds: Dataset) -> dataset_service_pb2.DescribeDatasetResponse:
    out = dataset_service_pb2.DescribeDatasetResponse(name=ds.name)
    for cat in ds.categories:
        out.categories.add(name=cat, entry_names=ds.entry_names.get(cat, []))
    for s, name in enumerate(ds.subjects):
        subject = out.subjects.add(index=s, name=name)
        for cat, shape, dtype, is_string in ds.array_info(s):
            info = subject.arrays.add(category=cat, shape=shape, is_string=is_string)
            if not is_string:
                info.dtype = tensors.dtype_to_proto(dtype)
        if ds.geometry is not None:
            subject.image_properties.CopyFrom(image_properties(ds.geometry[s]).to_proto())
    return out


class PatchwireServer:
    """A running patchwire server. ``async with PatchwireServer(config) as server: ...`` or start()/stop()."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._executor: ThreadPoolExecutor | None = None
        self._datasets: dict[str, ServedDataset] = {}
        self._assembly: AssemblyStore | None = None
        self.cache: BlockCache | None = None
        self._temp_state: Path | None = None
        self._shm_socket: SharedMemorySocket | None = None
        self.port: int | None = None
        self.calls = CallLimiter(config.limits)
        self.servicer: DatasetServicer | None = None
        """The calls and streams open now, per identity (see :class:`CallLimiter`)."""

    async def start(self) -> PatchwireServer:
        cfg = self.config
        warning = exposed_without_tls(cfg.host, cfg.tls_cert is not None)
        if warning is not None:
            _log.warning("%s", warning)
        try:
            # credentials first: a bad key or auth file fails before any dataset is opened
            if (cfg.tls_cert is None) != (cfg.tls_key is None) or (cfg.tls_client_ca and cfg.tls_cert is None):
                raise ValueError("TLS needs both a certificate and its key (a client CA only with them)")
            auth = load_auth_config(cfg.auth_config) if cfg.auth_config is not None else None
            tls = (
                server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                if cfg.tls_cert is not None and cfg.tls_key is not None
                else None
            )
            self.cache = BlockCache(cfg.cache_bytes)
            for name, path in cfg.datasets.items():
                self._datasets[name] = ServedDataset(name, path, self.cache, cfg.verify)
            if cfg.datasets and not any(ds.available for ds in self._datasets.values()):
                reasons = "; ".join(f"dataset {name!r}: {ds.reason}" for name, ds in self._datasets.items())
                raise FailedPrecondition(f"{reasons} (no dataset can be served)")
            self._executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="patchwire-read")
            cache = DatasourceCache(self._datasets, limits=cfg.limits)
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
                limits=cfg.limits,
            )
            await asyncio.get_running_loop().run_in_executor(self._executor, self._assembly.load)
            regions = None
            if cfg.shared_memory and shared_memory.available():
                regions = SharedRegions(cfg.shared_memory_uids)
                self._shm_socket = SharedMemorySocket(regions, cfg.shared_memory_dir)
                self._shm_socket.start()
            self.servicer = DatasetServicer(self._datasets, self._executor, cache, cfg.limits)
            server = grpc.aio.server(
                options=list(cfg.options), interceptors=[ReflectionGate(auth)] if auth is not None else None
            )
            server.add_generic_rpc_handlers(
                (
                    _handlers(self.servicer, SERVICE_NAME, auth, self.calls),
                    _handlers(
                        AssemblyServicer(self._assembly, self._executor, regions),
                        ASSEMBLY_SERVICE_NAME,
                        auth,
                        self.calls,
                    ),
                )
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, ASSEMBLY_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            if tls is not None:
                self.port = server.add_secure_port(f"{cfg.host}:{cfg.port}", tls)
            else:
                self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
            if auth is not None and tls is None:
                _log.warning("authentication without TLS: bearer tokens cross the network in clear")
            await server.start()
        except BaseException:  # a dataset that does not open, a port that is taken: free what was opened
            self._release()
            raise
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()

        def follow(*_: object) -> None:  # changes are noticed on reading threads: health follows on the loop
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._set_dataset_health()))

        for served in self._datasets.values():
            served.listeners.append(follow)
        served_names = [name for name, ds in self._datasets.items() if ds.available]
        _log.info(
            "patchwire serving %s on %s:%s (%s, %s)",
            ", ".join(served_names) or "no datasets",
            cfg.host,
            self.port,
            "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext",
            "authentication on" if auth is not None else "no authentication",
        )
        return self

    async def _set_health(self, status: int) -> None:
        """``""`` and DatasetService follow ``status`` while at least one dataset can be served (NOT_SERVING once
        none can); ``DatasetService/<name>`` says whether each dataset is served."""
        await self._health.set(ASSEMBLY_SERVICE_NAME, status)
        await self._set_dataset_health(status)

    async def _set_dataset_health(self, status: int = health_pb2.HealthCheckResponse.SERVING) -> None:
        if self._server is None and status == health_pb2.HealthCheckResponse.SERVING:
            return  # stopped meanwhile
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name, served in self._datasets.items():
            await self._health.set(dataset_health_name(name), status if served.available else not_serving)
        anything = (not self._datasets) or any(ds.available for ds in self._datasets.values())
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status if anything else not_serving)

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
        if self._shm_socket is not None:
            self._shm_socket.stop()  # every client connection closes: their regions are dropped
            self._shm_socket = None
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
