"""The gRPC server: its configuration and lifecycle, with DatasetService (:mod:`._dataset_service`),
AssemblyService (:mod:`.assembly`) and the standard health and reflection services, on ``grpc.aio``; every method
passes the authentication gate, the call limits and request parsing first (:func:`_handlers`)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from patchwire.service._auth import Authenticator, ReflectionGate, gated_handlers, load_auth_config
from patchwire.service._cache import BlockCache
from patchwire.service._calls import CallObserver, CallTable
from patchwire.service._codecs import OfferedCodecs
from patchwire.service._dataset_service import DatasetServicer
from patchwire.service._datasource import DatasourceCache
from patchwire.service._errors import FailedPrecondition, quiet_client_endings
from patchwire.service._forwarding import ForwardedIdentities, HomeDatasets, HomeLink, start_home_server
from patchwire.service._limits import CallLimiter, Limits
from patchwire.service._metrics import ServerMetrics
from patchwire.service._packed_samples import PackedSamples
from patchwire.service._requests import parsed
from patchwire.service._served import ServedDataset
from patchwire.service._server_service import ServerServicer
from patchwire.service._shared_regions import SharedRegions
from patchwire.service._shared_socket import SharedMemorySocket
from patchwire.service._tls import exposed_without_tls, server_credentials
from patchwire.service.assembly import AssemblyServicer, AssemblyStore
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import dataset_service_pb2, server_service_pb2
from patchwire.wire import compression, framing, shared_memory
from patchwire.wire.replicas import check_replica_id, default_replica_id

__all__ = ["PatchwireServer", "ServerConfig", "dataset_health_name"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name
ASSEMBLY_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AssemblyService"].full_name
SERVER_SERVICE_NAME = server_service_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name


def dataset_health_name(dataset: str) -> str:
    """The health service name of one dataset: SERVING while the server serves it, NOT_SERVING while it cannot."""
    return f"{SERVICE_NAME}/{dataset}"


@dataclass(frozen=True)
class ServerConfig:
    """How a patchwire server runs."""

    datasets: Mapping[str, Path]
    """Dataset name -> pymia-format HDF5 file."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 50051
    """Port to bind; 0 picks a free one (see PatchwireServer.port)."""
    read_threads: int = 4
    """Threads of each serving process that read and transform samples (h5py serialises reads; numpy work runs in
    parallel)."""
    workers: int = 0
    """Serving processes sharing the port (``patchwire serve --workers``; :mod:`patchwire.service._workers`): 0 picks
    the CPUs this process may use, at most 8 (``_workers.AUTO_MAX``: each process keeps its own block cache and HDF5
    handles, so memory grows with every one, while one link is full long before that). 1: one process, no supervisor.
    Assembly jobs are always served by process 0; the others forward those calls to it."""
    worker_index: int = 0
    """Which serving process this is (0 to workers - 1); 0 is the home of assembly jobs and of the shared-memory
    socket."""
    run_dir: Path | None = None
    """A private folder (0700) shared by one server's processes: the home process's internal Unix socket, metrics
    files, stream tables. None when one process serves (set by the supervisor, never by hand)."""
    grace_seconds: float = 5.0
    """How long stop() lets running calls finish."""
    options: Sequence[tuple[str, Any]] = field(default_factory=framing.channel_options)
    """gRPC server options; the message-size limits are set deliberately on both ends."""
    state_dir: Path | None = None
    """Where assembly jobs live (journals, partial volumes, results); a restart with the same folder recovers them.
    None: a temporary folder removed at stop (jobs are then not durable across restarts)."""
    cache_bytes: int = 1 << 30
    """Capacity of the block cache shared by all datasets and clients (0 disables it)."""
    packed_cache_bytes: int = 512 << 20
    """Capacity of the cache of samples kept compressed for the wire (the compressed bytes; 0 disables it): samples
    of deterministic datasources that a stream asked to have compressed with a blosc2 codec are sent again from it,
    neither read nor compressed again (:mod:`patchwire.service._packed_samples`)."""
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
    auth: Authenticator | None = None
    """Identities given inline instead of in ``auth_config`` (a configuration file's ``[auth]`` table, laid out like
    that file: ``[[auth.identity]]`` tables); at most one of the two."""
    limits: Limits = field(default_factory=Limits)
    """What one request, identity or job may make the server hold (:mod:`patchwire.service._limits`)."""
    replica_id: str = field(default_factory=lambda: default_replica_id(socket.gethostname()))
    """This server's stable name among replicas serving the same datasets: 1 to 63 letters, digits, '_' or '-' (no
    '.'). Default: the host's name up to its first '.', which is the pod's name in a Kubernetes StatefulSet. Assembly
    jobs whose ids it chooses begin with ``<replica_id>.``: it is their home (:mod:`patchwire.wire.replicas`)."""
    verify: bool = False
    """Take a CRC-32 of every stored block of every dataset's arrays at open (reading each file once) and check every
    block read from disk against it before it is cached or served; a mismatch stops serving that dataset
    (:mod:`patchwire.service._integrity`)."""
    compressions: tuple[compression.CodecName, ...] = compression.SUPPORTED
    """Codecs clients may ask this server to compress tensors with, by name: ``shuffle-lz4``, ``shuffle-zstd``
    (blosc2 byte shuffle with LZ4 or Zstandard, for any dtype) and ``lz4`` (integer and bool tensors, or any with
    ``compression``); empty: none. A request for another is INVALID_ARGUMENT naming these. Clients with
    ``compression="auto"`` pick one of them on non-loopback links (:mod:`patchwire.wire.compression`)."""
    metrics_port: int | None = None
    """Port of the Prometheus ``/metrics`` HTTP endpoint (0: a free one; None: no endpoint). One endpoint per server,
    summing every serving process (:mod:`patchwire.service._metrics`)."""
    metrics_host: str = "127.0.0.1"
    """Interface the metrics endpoint binds (0.0.0.0 for all, e.g. for a Prometheus in another pod)."""

    def __post_init__(self) -> None:
        check_replica_id(self.replica_id)  # (ValueError: it becomes part of job ids and folder names)


KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
"""Server options: clients' keepalive pings (``patchwire.client.Timeouts``, every 10 s by default) are accepted down
to one a second, with or without calls in flight, instead of gRPC's default of one per 5 minutes (a client pinging
faster would be sent away with GOAWAY); the server pings idle connections itself, so the streams of a client that
vanished (a killed host, a silent network partition) end within 40 s."""


def _handlers(
    servicer: Any, service_name: str, auth: Authenticator | None = None, limiter: CallLimiter | None = None
) -> grpc.GenericRpcHandler:
    """The servicer's methods as gRPC handlers whose responses may be pre-serialised bytes (see
    ``framing.passthrough_serializer``) and whose requests arrive as bytes, parsed by the handler (``_requests.parsed``:
    INVALID_ARGUMENT for bytes that do not parse): like the generated ``add_*Servicer_to_server`` otherwise.
    With ``auth`` each method first passes the authentication and role gate (``_auth.guarded``), then, with
    ``limiter``, the limits on concurrent calls (``_limits.CallLimiter``), which count by the identity the gate set;
    only then is a request parsed (``_auth.gated_handlers``)."""

    def behaviour_of(m: Any) -> Callable[..., Any]:
        # requests arrive as wire bytes: bytes that do not parse get INVALID_ARGUMENT (not gRPC's UNKNOWN), and
        # streamed chunk messages are read without protobuf's copy
        return getattr(servicer, m.name) if m.client_streaming else parsed(getattr(servicer, m.name), m)

    return gated_handlers(service_name, behaviour_of, auth, limiter, framing.passthrough_serializer)


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
        self.packed: PackedSamples | None = None
        self._temp_state: Path | None = None
        self._shm_socket: SharedMemorySocket | None = None
        self._home_server: grpc.aio.Server | None = None
        """Process 0 of several: the internal server other processes forward assembly calls to."""
        self._home_link: HomeLink | None = None
        """Any other process of several: its channel to process 0."""
        self.port: int | None = None
        self.calls = CallLimiter(config.limits)
        self.streams = CallTable(config.worker_index, config.run_dir)
        """This process's open calls (ListStreams, ``patchwire top``)."""
        self.metrics: ServerMetrics | None = None
        """The running server's metrics work (``metrics.port``: the endpoint of a server of one process)."""
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
            if cfg.auth_config is not None and cfg.auth is not None:
                raise ValueError("give identities in auth_config or inline in auth, not both")
            auth = load_auth_config(cfg.auth_config) if cfg.auth_config is not None else cfg.auth
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
            self._executor = ThreadPoolExecutor(max_workers=cfg.read_threads, thread_name_prefix="patchwire-read")
            cache = DatasourceCache(self._datasets, limits=cfg.limits)
            # one of several processes other than the first: assembly jobs and shared-memory regions live in the first
            forwarding = cfg.run_dir is not None and cfg.worker_index > 0
            if not forwarding:
                state_dir = cfg.state_dir
                if state_dir is None:
                    self._temp_state = state_dir = Path(tempfile.mkdtemp(prefix="patchwire-state-"))
                    _log.warning(
                        "no state folder given: assembly jobs live in %s, unjournalled, and are lost at stop",
                        state_dir,
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
            if cfg.shared_memory and shared_memory.available() and not forwarding:
                regions = SharedRegions(cfg.shared_memory_uids)
                self._shm_socket = SharedMemorySocket(regions, cfg.shared_memory_dir)
                self._shm_socket.start()
            self.packed = PackedSamples(cfg.packed_cache_bytes, self._datasets)
            self.servicer = DatasetServicer(
                self._datasets,
                self._executor,
                cache,
                cfg.limits,
                regions,
                compressions=cfg.compressions,
                packed=self.packed,
            )
            quiet_client_endings()  # a client gone under a stream is not a server error
            server = grpc.aio.server(
                options=[*KEEPALIVE_OPTIONS, *cfg.options],
                # every call on the port is observed (request id, open-call table, metrics), refusals included
                interceptors=[CallObserver(self.streams), *([ReflectionGate(auth)] if auth is not None else [])],
            )
            if forwarding:  # (see patchwire.service._forwarding)
                assert cfg.run_dir is not None
                self._home_link = link = HomeLink(cfg.run_dir)
                datasets = _handlers(HomeDatasets(self.servicer, link), SERVICE_NAME, auth, self.calls)
                assembly = link.handlers(ASSEMBLY_SERVICE_NAME, auth, self.calls)
            else:
                assert self._assembly is not None
                offered = OfferedCodecs(cfg.compressions)
                assembly_servicer = AssemblyServicer(self._assembly, self._executor, regions, cfg.replica_id, offered)
                datasets = _handlers(self.servicer, SERVICE_NAME, auth, self.calls)
                assembly = _handlers(assembly_servicer, ASSEMBLY_SERVICE_NAME, auth, self.calls)
                if cfg.run_dir is not None:  # the home of several processes: they forward to its internal socket
                    forwarded = ForwardedIdentities()
                    self._home_server = await start_home_server(
                        cfg.run_dir,
                        (
                            _handlers(self.servicer, SERVICE_NAME, forwarded, self.calls),
                            _handlers(assembly_servicer, ASSEMBLY_SERVICE_NAME, forwarded, self.calls),
                        ),
                        [*KEEPALIVE_OPTIONS, *cfg.options],
                        # forwarded calls were observed where they arrived: here only their samples and log context
                        [CallObserver(self.streams, forwarded=True)],
                    )
            server.add_generic_rpc_handlers(
                (
                    datasets,
                    assembly,
                    _handlers(ServerServicer(cfg, self.streams), SERVER_SERVICE_NAME, auth, self.calls),
                )
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    ASSEMBLY_SERVICE_NAME,
                    SERVER_SERVICE_NAME,
                    health.SERVICE_NAME,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
            if tls is not None:
                self.port = server.add_secure_port(f"{cfg.host}:{cfg.port}", tls)
            else:
                self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
            if auth is not None and tls is None:
                _log.warning("authentication without TLS: bearer tokens cross the network in clear")
            self.metrics = ServerMetrics(cfg, self.streams, self.cache, self._assembly, self.packed).start()
            await server.start()
        except BaseException:  # a dataset that does not open, a port that is taken: free what was opened
            await self._close_links(0)
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
        grace = self.config.grace_seconds if grace is None else grace
        # calls forwarded to the home finish within the same grace as its own
        await asyncio.gather(server.stop(grace), self._close_links(grace))
        self._release()
        _log.info("patchwire server stopped")

    async def _close_links(self, grace: float) -> None:
        """Stops the home's internal server (letting forwarded calls finish for ``grace`` seconds) or closes the
        channel to the home."""
        home, self._home_server = self._home_server, None
        link, self._home_link = self._home_link, None
        if home is not None:
            await home.stop(grace)
        if link is not None:
            await link.close()

    def _release(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
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
    def assembly(self) -> AssemblyStore | None:
        """The assembly jobs of a running server (None before start and after stop)."""
        return self._assembly

    @property
    def shared_memory_socket(self) -> SharedMemorySocket | None:
        """The Unix socket same-host clients hand their segments over (None where shared memory is off)."""
        return self._shm_socket

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def __aenter__(self) -> PatchwireServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
