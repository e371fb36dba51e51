"""Several serving processes behind one port (``patchwire serve --workers N``), and the supervisor that runs them.

One Python process serves what one core can: h5py reads behind one lock and gRPC's Python server runs on one event
loop. So N processes serve the same port, as in gRPC's own multiprocessing example: the supervisor reserves the port
(a socket bound with ``SO_REUSEPORT`` that never listens, so port 0 becomes a real port the workers share and no other
program takes it while a worker restarts), then forks the workers *before any gRPC object exists in it* (gRPC's state
does not survive a fork), each of which starts its own event loop and :class:`~patchwire.service.PatchwireServer`
bound to that port with ``grpc.so_reuseport``, with its own HDF5 handles, block cache and reading threads. The kernel
spreads incoming connections over the listening workers; one gRPC channel is one connection, so every call of a
channel reaches the same worker.

Assembly jobs keep one owner: worker 0 is their home (and the home of the shared-memory socket); the others forward
those calls to it over a Unix socket in ``run_dir`` (:mod:`patchwire.service._forwarding`). ``run_dir`` is a private
folder (``mkdtemp``, mode 0700) made by the supervisor and removed when it ends; the metrics of every worker live there
too (:mod:`patchwire.service._metrics`).

The supervisor (:class:`Supervisor`) announces the server once every worker serves (each says so through a pipe, or
sends the error that stopped it: then the others are stopped and the error is the supervisor's), stops them all
gracefully on SIGTERM or SIGINT (each flips its health to NOT_SERVING and lets calls finish within the grace), and
restarts a worker that ends unexpectedly: at once the first time, then after a growing pause while it keeps ending
within :data:`STABLE_S` of its start (:func:`restart_delay`). Workers ignore SIGINT (a terminal's Ctrl-C reaches the
whole process group: the supervisor stops them) and get SIGTERM if the supervisor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from patchwire.service._server import PatchwireServer, ServerConfig

__all__ = [
    "AUTO_MAX",
    "STABLE_S",
    "Supervisor",
    "WorkersFailed",
    "cgroup_cpu_limit",
    "reserve_port",
    "restart_delay",
    "usable_cpus",
    "worker_count",
]

_log = logging.getLogger(__name__)

AUTO_MAX = 8
"""The most workers ``--workers 0`` starts. Each worker keeps its own block cache (``--cache-mb`` each), HDF5 handles
and reading threads, so memory grows with every one, while a server's link is usually full well before: one worker
streams about 1-2 GB/s of large samples, a 25 Gbit/s link carries about 3 GB/s. More can be asked for explicitly."""
STABLE_S = 30.0
"""A worker that served this long before it ended is restarted at once; one that ended sooner, after a pause."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STOP_MARGIN_S = 10.0
"""How long after the grace a worker may take to exit before it is killed."""
_SIGNALS = {signal.SIGTERM, signal.SIGINT}
CGROUPS = Path("/sys/fs/cgroup")
OWN_CGROUP = Path("/proc/self/cgroup")
_PR_SET_PDEATHSIG = 1
_MESSAGE_MAX = 4000
"""A worker's report fits one atomic pipe write (PIPE_BUF is 4096)."""


class WorkersFailed(Exception):
    """The workers could not start; the message is the first worker's error (as the single process reports it)."""


def usable_cpus(cgroups: Path = CGROUPS, own: Path = OWN_CGROUP) -> int:
    """The CPUs this process may use: those it may run on (its affinity mask, e.g. a container's cpuset), at most its
    cgroup's CPU limit rounded down (:func:`cgroup_cpu_limit`: a Kubernetes container's CPU limit), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroups, own)
    return max(1, min(cpus, int(limit))) if limit is not None else cpus


def cgroup_cpu_limit(cgroups: Path = CGROUPS, own: Path = OWN_CGROUP) -> float | None:
    """The CPU limit (a CFS quota over its period, in CPUs) of this process's cgroup, as a container runtime sets it
    for a CPU limit; None without one. cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``),
    in the process's own cgroup (``own``: ``/proc/self/cgroup``) or, inside a container, at the mount's root."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and not controllers:  # v2: "0::/path"
            for folder in (cgroups / relative, cgroups):
                with contextlib.suppress(OSError, ValueError):
                    quota, period = (folder / "cpu.max").read_text().split()
                    return None if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # v1: "N:cpu,cpuacct:/path"
            for folder in (cgroups / controllers / relative, cgroups / controllers, cgroups / "cpu"):
                with contextlib.suppress(OSError, ValueError):
                    cfs_quota = int((folder / "cpu.cfs_quota_us").read_text())
                    cfs_period = int((folder / "cpu.cfs_period_us").read_text())
                    return None if cfs_quota <= 0 else cfs_quota / cfs_period
    return None


def worker_count(workers: int, cpus: Callable[[], int] = usable_cpus) -> int:
    """The processes ``ServerConfig.workers`` asks for: itself, or for 0 the usable CPUs (:func:`usable_cpus`) up to
    :data:`AUTO_MAX`."""
    if workers < 0:
        raise ValueError(f"workers: 0 (one per CPU) or more, got {workers}")
    return workers if workers > 0 else max(1, min(cpus(), AUTO_MAX))


def restart_delay(failures: int) -> float:
    """Seconds before a worker is started again after ``failures`` ends in a row, each within :data:`STABLE_S` of its
    start (0: the first end of a worker that had served a while)."""
    return 0.0 if failures <= 0 else min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, never listening: the port the workers share (port 0:
    a free one, see ``getsockname``). OSError where the port is in use: a probe without ``SO_REUSEPORT`` binds first,
    so a port another server listens on (with or without ``SO_REUSEPORT``) is refused rather than shared."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a port in TIME_WAIT is free, as for gRPC)
        try:
            probe.bind(address)
        except OSError as exc:
            raise _bind_error(host, port, exc) from None
        bound = probe.getsockname()[1]
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((address[0], bound, *address[2:]))
    except OSError as exc:
        reserved.close()
        raise _bind_error(host, bound, exc) from None
    return reserved


def _bind_error(host: str, port: int, exc: OSError) -> OSError:
    error = OSError(f"cannot bind {host}:{port}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error


def make_run_dir() -> Path:
    """A private folder (0700) for one server's processes, short enough for Unix socket paths inside it."""
    run_dir = tempfile.mkdtemp(prefix="patchwire-run-")
    if len(os.fsencode(run_dir)) > 90:  # a long TMPDIR: sockets in it would not fit sun_path (108 bytes)
        os.rmdir(run_dir)
        run_dir = tempfile.mkdtemp(prefix="patchwire-run-", dir="/tmp")
    return Path(run_dir)


@dataclass
class _Worker:
    index: int
    process: BaseProcess | None = None
    reports: int = -1
    """Read end of the pipe the worker reports through (-1: closed)."""
    started: float = 0.0
    serving: bool = False
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``config.workers`` (at least 2) serving processes of ``config`` (:meth:`run`). ``clock``: monotonic
    seconds."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.workers = worker_count(config.workers)
        self.run_dir: Path | None = None
        self.port: int | None = None
        self._clock = clock
        self._context = multiprocessing.get_context("fork")
        self._slots = [_Worker(i) for i in range(self.workers)]
        self._selector: selectors.BaseSelector | None = None
        self._wake: tuple[int, int] | None = None
        self._reserved: socket.socket | None = None
        self._stopping = False
        self._failure: str | None = None
        self._worker_config = config

    # -- the supervisor's life ----------------------------------------------------------------------------------------

    def run(self, announce: Callable[[int], None]) -> None:
        """Reserves the port, starts the workers, calls ``announce(port)`` once every one serves, and returns after
        SIGTERM or SIGINT once every worker has stopped (``run_dir`` removed). Raises OSError for a port that cannot be
        reserved, WorkersFailed when a worker cannot start (the others are stopped first)."""
        from patchwire.service import _metrics

        cfg = self.config
        self._reserved = reserve_port(cfg.host, cfg.port)
        self.port = self._reserved.getsockname()[1]
        self.run_dir = make_run_dir()
        self._worker_config = dataclasses.replace(
            cfg,
            port=self.port,
            workers=self.workers,
            run_dir=self.run_dir,
            options=[*cfg.options, ("grpc.so_reuseport", 1)],
        )
        previous = {s: signal.getsignal(s) for s in _SIGNALS}
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake = (wake_r, wake_w)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        self._selector = selectors.DefaultSelector()
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        metrics_port = None
        try:
            for sig in _SIGNALS:
                signal.signal(sig, self._signalled)
            if cfg.metrics_port is not None:
                metrics_port = _metrics.start_http(cfg.metrics_host, cfg.metrics_port, self.run_dir)
            for slot in self._slots:
                self._start(slot)
            self._loop(announce)
        finally:
            self._stop_all()
            if metrics_port is not None:
                _metrics.stop_http(metrics_port)
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            for fd in self._wake:
                os.close(fd)
            self._reserved.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._failure is not None:
            raise WorkersFailed(self._failure)

    def _signalled(self, signum: int, frame: object) -> None:
        self._stopping = True  # (the wake-up descriptor ends the selector's wait)

    def _loop(self, announce: Callable[[int], None]) -> None:
        assert self._selector is not None and self.port is not None
        announced = False
        while not self._stopping and self._failure is None:
            if not announced and all(slot.serving for slot in self._slots):
                announced = True
                _log.info("%d workers serve port %d (run folder %s)", self.workers, self.port, self.run_dir)
                announce(self.port)
            now = self._clock()
            due = [s.restart_at for s in self._slots if s.restart_at is not None]
            timeout = None if not due else max(0.0, min(due) - now)
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(key.fd, 512)  # signals (the handler has set the flag)
                    continue
                kind, slot = key.data
                if kind == "report":
                    if key.fd == slot.reports:  # (not one an end earlier in this batch has already read and closed)
                        self._read_report(slot, announced)
                elif slot.process is not None and key.fd == slot.process.sentinel:
                    self._ended(slot, announced)
            now = self._clock()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                    slot.restart_at = None
                    self._start(slot)

    # -- one worker ----------------------------------------------------------------------------------------------------

    def _start(self, slot: _Worker) -> None:
        assert self._selector is not None and self._wake is not None and self._reserved is not None
        reports_r, reports_w = os.pipe2(os.O_CLOEXEC)
        inherited = [self._wake[0], self._wake[1], self._reserved.fileno(), reports_r]
        if isinstance(self._selector, selectors.EpollSelector):
            inherited.append(self._selector.fileno())
        inherited += [s.reports for s in self._slots if s.reports >= 0]
        config = dataclasses.replace(self._worker_config, worker_index=slot.index)
        process = self._context.Process(
            target=_worker_main,
            args=(config, reports_w, inherited, os.getpid()),
            name=f"patchwire-worker-{slot.index}",
            daemon=False,
        )
        # signals wait until the child has its own handlers (a SIGTERM meant for the supervisor stays the supervisor's)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(reports_w)
        slot.process, slot.reports, slot.started, slot.serving = process, reports_r, self._clock(), False
        self._selector.register(reports_r, selectors.EVENT_READ, ("report", slot))
        self._selector.register(process.sentinel, selectors.EVENT_READ, ("exit", slot))
        _log.debug("worker %d started (pid %s)", slot.index, process.pid)

    def _read_report(self, slot: _Worker, announced: bool) -> None:
        assert self._selector is not None
        try:
            data = os.read(slot.reports, _MESSAGE_MAX + 64)
        except OSError:
            data = b""
        if not data:  # the worker closed its end (it serves, or it ended)
            self._selector.unregister(slot.reports)
            os.close(slot.reports)
            slot.reports = -1
            return
        kind, _, text = data.decode(errors="replace").strip().partition(" ")
        if kind == "ready":
            slot.serving = True
            if announced:
                _log.info("worker %d serves again (pid %s)", slot.index, slot.process and slot.process.pid)
        elif not announced:
            self._failure = self._failure or text
        else:
            _log.error("worker %d could not start again: %s", slot.index, text)

    def _ended(self, slot: _Worker, announced: bool) -> None:
        assert self._selector is not None and slot.process is not None
        process = slot.process
        self._selector.unregister(process.sentinel)
        process.join()
        self._exited(process)
        if slot.reports >= 0:  # a report written just before the end is read first
            while slot.reports >= 0:
                self._read_report(slot, announced)
        slot.process, slot.serving = None, False
        if self._stopping:
            return
        how = _how_it_ended(process.exitcode)
        if not announced:
            self._failure = self._failure or f"worker {slot.index} {how} before it served"
            return
        ran = self._clock() - slot.started
        slot.failures = 0 if ran >= STABLE_S else slot.failures + 1
        delay = restart_delay(slot.failures)
        _log.warning(
            "worker %d (pid %s) %s after %.1f s; starting it again in %.1f s", slot.index, process.pid, how, ran, delay
        )
        slot.restart_at = self._clock() + delay

    def _exited(self, process: BaseProcess) -> None:
        from patchwire.service import _metrics

        if process.pid is not None:
            _metrics.process_exited(process.pid, self.run_dir)

    def _stop_all(self) -> None:
        """SIGTERM to every worker (each stops gracefully), SIGKILL to those still running after the grace and
        :data:`STOP_MARGIN_S`."""
        self._stopping = True
        running = [s.process for s in self._slots if s.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                if process.pid is not None:
                    os.kill(process.pid, signal.SIGTERM)
        deadline = self._clock() + self.config.grace_seconds + STOP_MARGIN_S
        for process in running:
            process.join(max(0.0, deadline - self._clock()))
            if process.exitcode is None:
                _log.warning("worker %s did not stop within the grace: killed", process.name)
                process.kill()
                process.join()
            self._exited(process)
        for slot in self._slots:
            slot.process = None
            if slot.reports >= 0:
                os.close(slot.reports)
                slot.reports = -1


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"ended with exit status {exitcode}"


# -- in a worker ----------------------------------------------------------------------------------------------------


def _worker_main(config: ServerConfig, reports: int, inherited: Sequence[int], parent: int) -> None:
    """A forked worker: its own signal handling, then its own event loop and server; exits with the server's status."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor stops the workers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    _end_with(parent)
    from patchwire.service import _metrics

    _metrics.init_process(config.run_dir, config.worker_index)
    import uvloop

    sys.exit(uvloop.run(_serve(config, reports)))


def _end_with(parent: int) -> None:
    """SIGTERM to this process when the supervisor dies (even by SIGKILL), so no worker serves on without it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _report(fd: int, text: str) -> None:
    data = " ".join(text.split()).encode()[:_MESSAGE_MAX]
    with contextlib.suppress(OSError):
        os.write(fd, data + b"\n")


async def _serve(config: ServerConfig, reports: int) -> int:
    from patchwire.service._errors import ServiceError
    from patchwire.wire.malloc import tune_malloc

    tune_malloc(arena_max=2)
    server = PatchwireServer(config)
    try:
        await server.start()
    except (ServiceError, RuntimeError, ValueError, OSError) as exc:
        # no dataset that can be served; a port that cannot be bound; an unusable auth config or certificate
        _report(reports, f"error {exc}")
        return 1
    except BaseException as exc:
        _report(reports, f"error {type(exc).__name__}: {exc}")
        raise
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    _report(reports, f"ready {server.port}")
    os.close(reports)
    _log.info("worker %d serves (pid %d)", config.worker_index, os.getpid())
    await stop.wait()
    await server.stop()
    return 0
