"""The server's Prometheus metrics, one HTTP endpoint per server, whatever its number of processes.

A server of one process keeps its metrics in memory (a registry of its own) and serves them itself
(``ServerConfig.metrics_port``). A server of several processes (``patchwire serve --workers N``) shares a private
``run_dir``: every serving process calls :func:`init_process` first thing, which puts prometheus-client in its
multiprocess mode, so each process writes its values to memory-mapped files under ``run_dir/"metrics"``; the
supervisor serves one endpoint (:func:`start_http`) that sums them, and calls :func:`process_exited` for a worker that
ended (its gauges leave the sums; its counters stay, so totals never go back).

Names follow Prometheus' conventions (``patchwire_`` prefix, base units in the name, ``_total`` for counters).
Labels are bounded by the server's configuration: ``dataset`` (the served datasets), ``identity`` (the configured
identities, or ``anonymous``), ``pattern`` (:data:`PATTERNS`), ``method`` (the services' methods), ``code`` (gRPC
status codes), ``limit`` (the limits' flags), ``state`` (job and subject states); never a stream, request or job.

Values the server counts anyway (the block cache's hits, misses and bytes; assembly jobs and subjects by state) are
read by pollers (:meth:`Metrics.add_poller`) when the endpoint is scraped (one process) or every second (several
processes, see :mod:`patchwire.service._calls`), instead of being counted twice on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter as Tally
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.registry import Collector

from patchwire.v1 import assembly_service_pb2 as apb

if TYPE_CHECKING:
    from patchwire.service._cache import BlockCache
    from patchwire.service._calls import CallTable
    from patchwire.service._packed_samples import PackedSamples
    from patchwire.service._server import ServerConfig
    from patchwire.service.assembly import AssemblyStore

__all__ = [
    "PATTERNS",
    "Metrics",
    "ServerMetrics",
    "init_process",
    "metrics",
    "pattern_of",
    "process_exited",
    "start_http",
    "stop_http",
]

_log = logging.getLogger(__name__)

disable_created_metrics()  # (a counter's start time as a series of its own: nothing a dashboard reads)

PATTERNS = ("subject", "slice", "patch", "voxel", "random_patch", "direct")
"""The ``pattern`` label: how a datasource's samples are cut (its indexing strategy: a whole subject, slices, a
patch grid, voxels, randomly sampled patches) or ``direct`` for DirectExtract."""

_STRATEGY_PATTERNS = {
    None: "subject",
    "empty": "subject",
    "slice": "slice",
    "patch_wise": "patch",
    "voxel_wise": "voxel",
    "patch_sampling": "random_patch",
}

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
"""Buckets of ``patchwire_rpc_duration_seconds``: from a cached unary call (a millisecond) to an epoch's stream."""


def pattern_of(spec: Any) -> str:
    """The ``pattern`` label of a DatasourceSpec (its indexing strategy's kind)."""
    strategy = spec.indexing_strategy.WhichOneof("strategy") if spec.HasField("indexing_strategy") else None
    return _STRATEGY_PATTERNS.get(strategy, "subject")


class Metrics:
    """Every metric of one serving process. ``registry``: where they are registered (None in multiprocess mode,
    where their values go to files and the endpoint reads those)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self.multiprocess = registry is None
        self._pollers: list[Callable[[], None]] = []
        self._poll_lock = threading.Lock()
        if registry is not None:
            registry.register(_Refresh(self))  # first: polled values are fresh before the others are collected
            ProcessCollector(registry=registry)  # CPU seconds, memory, open files (one process: its own)
        r = registry
        by_data = ["dataset", "identity", "pattern"]
        self.served_samples = Counter(
            "patchwire_served_samples",
            "Samples sent by GetSamples, StreamBatches and DirectExtract.",
            by_data,
            registry=r,
        )
        self.served_bytes = Counter(
            "patchwire_served_bytes",
            "Bytes of the messages and tensor payloads of those samples (on the wire, or written into a client's "
            "shared memory).",
            by_data,
            registry=r,
        )
        self.open_streams = Gauge(
            "patchwire_open_streams",
            "Streaming calls open now (server, client or both directions streaming).",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rpc_handled = Counter(
            "patchwire_rpc_handled", "Calls ended, by method and status code.", ["method", "code"], registry=r
        )
        self.rpc_duration = Histogram(
            "patchwire_rpc_duration_seconds",
            "How long calls lasted, from the handler's start to its status.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stream_wait = Counter(
            "patchwire_stream_wait_seconds",
            "Seconds streaming calls waited for the client to take their next message (gRPC's flow control).",
            ["method"],
            registry=r,
        )
        self.stream_work = Counter(
            "patchwire_stream_work_seconds",
            "Seconds streaming calls spent making their next message (reading, transforming, encoding; for "
            "PostPredictions also receiving and applying the next batch).",
            ["method"],
            registry=r,
        )
        self.refused = Counter(
            "patchwire_refused_requests",
            "Requests refused with RESOURCE_EXHAUSTED, by the limit they exceeded (its flag, e.g. max-calls).",
            ["limit"],
            registry=r,
        )
        self.cache = _cache_meters(
            r,
            "patchwire_cache",
            "block caches",
            "Block cache reads served from memory.",
            "Block cache reads that read from disk.",
        )
        self.packed = _cache_meters(
            r,
            "patchwire_packed_cache",
            "caches of compressed samples",
            "Samples sent again as they were kept compressed.",
            "Samples built and compressed to be kept.",
        )
        # assembly jobs live in one process; "livemax" stays right if other processes report none (or the same)
        self.assembly_jobs = Gauge(
            "patchwire_assembly_jobs", "Assembly jobs by state.", ["state"], registry=r, multiprocess_mode="livemax"
        )
        self.assembly_subjects = Gauge(
            "patchwire_assembly_subjects",
            "Subjects of the assembly jobs by state (ready: every sample arrived).",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.posted_samples = Counter(
            "patchwire_posted_samples", "Prediction samples received by PostPredictions.", ["identity"], registry=r
        )
        self.posted_bytes = Counter(
            "patchwire_posted_bytes",
            "Bytes of the prediction arrays received by PostPredictions (over the wire or shared memory).",
            ["identity"],
            registry=r,
        )

    def add_poller(self, poll: Callable[[], None]) -> None:
        """``poll`` sets metrics from values counted elsewhere; it runs before every scrape (one process) or on
        :meth:`refresh`."""
        with self._poll_lock:
            self._pollers.append(poll)

    def remove_poller(self, poll: Callable[[], None]) -> None:
        with self._poll_lock:
            if poll in self._pollers:
                self._pollers.remove(poll)

    def refresh(self) -> None:
        """Runs every poller (a failing one is logged and skipped: a scrape never fails for it)."""
        with self._poll_lock:
            pollers = list(self._pollers)
        for poll in pollers:
            try:
                poll()
            except Exception:
                _log.exception("metrics: a poller failed")


class _Refresh(Collector):
    """A collector that yields nothing and runs the pollers, registered first in a one-process registry."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._owner.refresh()
        return []


_metrics: Metrics | None = None
_lock = threading.Lock()
_http: dict[int, tuple[Any, threading.Thread]] = {}


def metrics() -> Metrics:
    """This process's metrics (made in memory on first use where :func:`init_process` was not called)."""
    global _metrics
    current = _metrics
    if current is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics(CollectorRegistry())
            current = _metrics
    return current


def _metrics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "metrics"


def init_process(run_dir: Path | None, worker_index: int) -> None:
    """Makes this process's metrics; call it first thing in each serving process, before any metric is touched.

    With ``run_dir`` (a server of several processes) prometheus-client's multiprocess mode writes every value to
    files in ``run_dir/"metrics"`` (made here), which :func:`start_http` sums; without, they stay in memory. A process
    forked from one that had metrics starts over with its own (a child must not write into its parent's values)."""
    global _metrics
    with _lock:
        if run_dir is None:
            values.ValueClass = values.MutexValue
            _metrics = Metrics(CollectorRegistry())
            return
        path = _metrics_dir(run_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # (where prometheus-client's values open their files)
        values.ValueClass = values.MultiProcessValue()
        _metrics = Metrics(None)
    _log.debug("metrics of worker %d in %s", worker_index, path)


def _registry(run_dir: Path | None) -> CollectorRegistry:
    if run_dir is None:
        registry = metrics().registry
        assert registry is not None, "a process in multiprocess mode serves its run_dir's metrics"
        return registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(_metrics_dir(run_dir)))
    return registry


def start_http(host: str, port: int, run_dir: Path | None) -> int:
    """Starts the ``/metrics`` HTTP endpoint on ``host:port`` (0: a free port) in a daemon thread; returns the port
    it bound. With ``run_dir`` it sums the files of every process of the server, else it serves this process's
    metrics. Called once per server (by the supervisor of several processes, else by the server itself)."""
    if run_dir is not None:
        _metrics_dir(run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    server, thread = start_http_server(port, addr=host, registry=_registry(run_dir))
    bound = int(server.server_address[1])
    with _lock:
        _http[bound] = (server, thread)
    _log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def stop_http(port: int) -> None:
    """Stops the endpoint :func:`start_http` started on ``port`` (idempotent)."""
    with _lock:
        started = _http.pop(port, None)
    if started is None:
        return
    server, thread = started
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def process_exited(pid: int, run_dir: Path | None) -> None:
    """Forgets a serving process that ended: its live gauges (open streams, cache bytes, jobs) leave the sums and
    its table of open calls leaves ListStreams; its counters stay. Nothing to do without ``run_dir``."""
    if run_dir is None:
        return
    path = _metrics_dir(run_dir)
    if path.is_dir():
        multiprocess.mark_process_dead(pid, str(path))
    (Path(run_dir) / "streams" / f"{pid}.json").unlink(missing_ok=True)


# -- one server's share --------------------------------------------------------------------------------------------


class _Share:
    """What one server adds to gauges that several servers of one process (tests, embedding) add to: set as deltas of
    its own last values, withdrawn when it stops."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def set(self, key: Hashable, gauge: Any, value: float) -> None:
        with self._lock:
            _, last = self._last.get(key, (gauge, 0.0))
            if value != last:
                gauge.inc(value - last)
            self._last[key] = (gauge, value)

    def withdraw(self) -> None:
        with self._lock:
            for gauge, last in self._last.values():
                if last:
                    gauge.dec(last)
            self._last.clear()


def _state_name(enum_name: str) -> str:
    """``JOB_STATE_ACTIVE`` -> ``active``."""
    return enum_name.split("_STATE_", 1)[-1].lower()


@dataclass(frozen=True)
class CacheMeters:
    """A cache's metrics: what it served (hits), what it did not (misses), the bytes it holds and its capacity (both
    summed over a server's processes)."""

    hits: Any
    misses: Any
    held: Any
    capacity: Any


def _cache_meters(registry: Any, prefix: str, caches: str, hit: str, missed: str) -> CacheMeters:
    """``{prefix}_hits``, ``_misses``, ``_bytes`` and ``_capacity_bytes`` of the ``caches`` (their plural name)."""
    held, capacity = f"Bytes the {caches} hold.", f"Capacity of the {caches} (one per serving process)."
    return CacheMeters(
        Counter(f"{prefix}_hits", hit, registry=registry),
        Counter(f"{prefix}_misses", missed, registry=registry),
        Gauge(f"{prefix}_bytes", held, registry=registry, multiprocess_mode="livesum"),
        Gauge(f"{prefix}_capacity_bytes", capacity, registry=registry, multiprocess_mode="livesum"),
    )


class ServerMetrics:
    """One server's metrics work: pollers of its block cache and assembly jobs, the ``/metrics`` endpoint of a server
    of one process (``config.metrics_port``), and in a server of several processes a task that refreshes the polled
    values and publishes the table of open calls every second (``table.publish``)."""

    def __init__(
        self,
        config: ServerConfig,
        table: CallTable,
        cache: BlockCache | None,
        store: AssemblyStore | None,
        packed: PackedSamples | None = None,
    ) -> None:
        self._config = config
        self._table = table
        self._cache = cache
        self._packed = packed
        self._store = store
        self._share = _Share()
        self._counts: dict[str, tuple[int, int]] = {}  # a cache's hits and misses when last polled
        self._lock = threading.Lock()  # (a scrape's thread and the loop may poll at once)
        self._metrics = metrics()
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None
        """The port of this server's own metrics endpoint (None: it has none)."""

    def start(self) -> ServerMetrics:
        """Starts polling (and the endpoint or the publishing task); on the server's event loop."""
        cfg = self._config
        self._metrics.add_poller(self.poll)
        if cfg.run_dir is not None:
            self._task = asyncio.get_running_loop().create_task(self._publish())
        elif cfg.metrics_port is not None:
            self.port = start_http(cfg.metrics_host, cfg.metrics_port, None)
        return self

    def _poll_cache(self, key: str, cache: BlockCache | PackedSamples | None, meters: CacheMeters) -> None:
        """A cache's hits and misses since the last poll, its bytes and capacity, onto its ``meters``."""
        if cache is None:
            return
        hits, misses = cache.hits, cache.misses
        with self._lock:
            seen_hits, seen_misses = self._counts.get(key, (0, 0))
            self._counts[key] = (hits, misses)
        if hits > seen_hits:
            meters.hits.inc(hits - seen_hits)
        if misses > seen_misses:
            meters.misses.inc(misses - seen_misses)
        self._share.set(f"{key}_bytes", meters.held, cache.nbytes)
        self._share.set(f"{key}_capacity", meters.capacity, max(cache.capacity_bytes, 0))

    def poll(self) -> None:
        """Sets the metrics this server counts elsewhere: its caches' hits, misses and bytes, its assembly jobs and
        their subjects by state."""
        m, share = self._metrics, self._share
        self._poll_cache("cache", self._cache, m.cache)
        self._poll_cache("packed", self._packed, m.packed)
        if self._store is not None:
            jobs = list(self._store.jobs.values())
            by_state = Tally(_state_name(apb.JobState.Name(job.state)) for job in jobs)
            subjects = Tally(
                _state_name(apb.SubjectState.Name(subject.state))
                for job in jobs
                for subject in list(job.subjects.values())
            )
            for kind, gauge, enum, counts in (
                ("job", m.assembly_jobs, apb.JobState, by_state),
                ("subject", m.assembly_subjects, apb.SubjectState, subjects),
            ):
                for value in enum.DESCRIPTOR.values:
                    if value.number:  # (0 is UNSPECIFIED)
                        state = _state_name(value.name)
                        share.set((kind, state), gauge.labels(state), counts[state])

    async def _publish(self) -> None:
        while True:
            try:
                self._metrics.refresh()
                self._table.publish()
            except OSError as exc:  # a run_dir removed under a stopping server: nothing to publish to
                _log.debug("metrics: cannot publish: %s", exc)
            await asyncio.sleep(PUBLISH_EVERY_S)

    def stop(self) -> None:
        """Stops the endpoint and the task and withdraws this server's gauges (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        port, self.port = self.port, None
        if port is not None:
            stop_http(port)
        self._metrics.remove_poller(self.poll)
        self._share.withdraw()


PUBLISH_EVERY_S = 1.0
"""How often a process of a server of several refreshes its polled metrics and rewrites its table of open calls."""
