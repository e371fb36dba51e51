"""LoaderStats: "am I input-bound?" — how long a training loop waits for data, next to what it received.

Every :class:`~patchwire.client.RemoteDatasource` keeps one (``ds.stats``; the torch adapters show the same object).
What is counted where:

- **Samples and bytes** are counted where they are fetched (``get_samples``, ``ds[i]``, each batch or sample of
  ``batches()`` / ``samples()``), in whichever process fetches them. The counters live in one small memfd made with
  the datasource, so forked DataLoader workers add to the main process's numbers (spawned and forkserver workers
  too: the descriptor travels with the datasource while a process is being started). Bytes are the array data
  delivered (after decompression), not the wire's framing.
- **Wire bytes** are the bytes of the messages the server sent over gRPC (protobuf framing included, gRPC's and
  TLS's not), counted as each message arrives (a prefetching stream runs a message or two ahead of what it
  delivered). Next to the delivered bytes they show what compression saved: ``snapshot().compression_ratio``.
  Samples read through shared memory add only their small messages.
- **Waits** are recorded in the process that made the datasource only. Each fetch call and each ``next`` of a
  datasource stream is one wait, unless the caller iterates through :meth:`LoaderStats.timed`: then each ``next``
  of that loop (a DataLoader, a ``tf.data`` dataset, anything) is one wait and the fetches inside it are not
  timed again. With DataLoader workers only ``timed`` can see what the loop waits for.
- **Loop time** runs from the first request (or timed ``next``) after the last reset to the last event: a batch
  handed over or a timed loop ending. A loop that waited at least :data:`INPUT_BOUND_THRESHOLD` of it is called
  input-bound.
- **Retries** are added by the code that retries a call (:meth:`LoaderStats.add_retry`).

Per-wait percentiles come from a fixed log-spaced histogram (20 buckets per decade from 1 us to 1000 s), so memory
does not grow with the epoch and a percentile is exact to about 6%.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import math
import mmap
import multiprocessing.context
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any, TypeVar, cast

import numpy as np

from patchwire.client import definition as defs

__all__ = ["INPUT_BOUND_THRESHOLD", "LoaderStats", "LoaderStatsSnapshot"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Share of the loop time spent waiting for data from which a loop is called input-bound: at 20% a data pipeline
#: that kept up with the compute would make each epoch 1.25x faster, more than tuning the model's step usually gains.
INPUT_BOUND_THRESHOLD = 0.2
_PER_DECADE = 20
_LOWEST = -6  # 1 us: the first bucket's lower edge (waits below it land in the underflow bucket 0)
_BUCKETS = 9 * _PER_DECADE + 2  # underflow, 1 us .. 1000 s, overflow
# slots of the shared block (float64: integers stay exact up to 2**53)
_SAMPLES, _BYTES, _RETRIES, _WAITS, _WAIT_SUM, _FIRST, _LAST, _WAIT_MIN, _WAIT_MAX, _WIRE, _HIST = range(11)
_SIZE = _HIST + _BUCKETS


@dataclass(frozen=True)
class LoaderStatsSnapshot:
    """The statistics at one moment (:meth:`LoaderStats.snapshot`)."""

    samples: int
    """Samples received, in this process and its DataLoader workers."""
    bytes: int
    """Bytes of array data received (after decompression)."""
    retries: int
    """Calls retried after a transient failure."""
    waits: int
    """Waits timed: one per fetch call, stream item or ``timed`` batch (main process only)."""
    wait_seconds: float
    """Time the main process spent waiting for data."""
    loop_seconds: float
    """Wall time from the first request after the last reset to the last event."""
    p50: float
    """Median wait in seconds (NaN without waits); p90 and p99 likewise."""
    p90: float
    p99: float
    wire_bytes: int = 0
    """Bytes of the messages received over gRPC for those samples (compressed payloads at their compressed size),
    plus the payloads that arrived through shared memory (never compressed): ``bytes / wire_bytes`` is what
    compression saved."""

    @property
    def compression_ratio(self) -> float:
        """Delivered bytes per wire byte (1.0 without compression, more with it; NaN before any wire byte)."""
        return self.bytes / self.wire_bytes if self.wire_bytes else math.nan

    @property
    def wait_fraction(self) -> float:
        """Share of the loop time spent waiting (0 when nothing was timed)."""
        return min(1.0, self.wait_seconds / self.loop_seconds) if self.loop_seconds > 0 else 0.0

    @property
    def input_bound(self) -> bool:
        """Whether the loop waited at least :data:`INPUT_BOUND_THRESHOLD` of its time."""
        return self.waits > 0 and self.wait_fraction >= INPUT_BOUND_THRESHOLD

    def summary(self) -> str:
        """One line, e.g. "waited for data 31% of 12.0 s (p50 4 ms, p90 18 ms, p99 40 ms per wait), 1,234 samples,
        456 MB, 0 retries: input-bound"."""
        delivered = _megabytes(self.bytes)
        if self.wire_bytes and abs(self.compression_ratio - 1) >= 0.05:
            delivered += f" ({_megabytes(self.wire_bytes)} on the wire, {self.compression_ratio:.1f}x)"
        received = f"{self.samples:,} samples, {delivered}, {self.retries:,} retries"
        if self.waits == 0:
            return f"{received}; no waits timed in this process (iterate through stats.timed(loader))"
        verdict = "input-bound" if self.input_bound else "compute-bound"
        percentiles = f"p50 {_duration(self.p50)}, p90 {_duration(self.p90)}, p99 {_duration(self.p99)} per wait"
        return (
            f"waited for data {100 * self.wait_fraction:.0f}% of {_duration(self.loop_seconds)} ({percentiles}), "
            f"{received}: {verdict}"
        )


class LoaderStats:
    """Samples, bytes, retries and waits of a datasource's loops; readable and resettable at any time, safe to update
    from threads and from forked DataLoader workers.

    ``clock``: seconds of a monotonic clock shared by all processes (default ``time.perf_counter``); tests inject one.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._attach(_shared_fd(), fresh=True)
        self._owner = os.getpid()
        self._clear()

    def _attach(self, fd: int, fresh: bool) -> None:
        """Maps the counters' block (a memfd: inherited by forked workers, handed to spawned ones)."""
        if fresh:
            os.ftruncate(fd, _SIZE * 8)
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        block = mmap.mmap(fd, _SIZE * 8)
        self._values = np.frombuffer(block, dtype=np.float64)  # for reading and clearing all at once
        self._slots = memoryview(block).cast("d")  # for updating one slot (Python floats: faster than numpy's)
        self._local = threading.local()
        self._explicit = 0  # timed() loops running in this process
        self._thread_lock = threading.Lock()
        self._thread_lock_pid = os.getpid()

    # -- reading ----------------------------------------------------------------------------------------------------

    def snapshot(self) -> LoaderStatsSnapshot:
        with self._locked():
            v = self._values.copy()
        hist = v[_HIST:]
        loop = float(v[_LAST] - v[_FIRST]) if math.isfinite(v[_FIRST]) else 0.0
        p50, p90, p99 = (_percentile(hist, q, v[_WAIT_MIN], v[_WAIT_MAX]) for q in (0.5, 0.9, 0.99))
        return LoaderStatsSnapshot(
            int(v[_SAMPLES]),
            int(v[_BYTES]),
            int(v[_RETRIES]),
            int(v[_WAITS]),
            float(v[_WAIT_SUM]),
            loop,
            p50,
            p90,
            p99,
            int(v[_WIRE]),
        )

    def summary(self) -> str:
        """The short human summary of :meth:`LoaderStatsSnapshot.summary`."""
        return self.snapshot().summary()

    def __repr__(self) -> str:
        return f"LoaderStats({self.summary()})"

    def reset(self) -> None:
        """Starts counting afresh (e.g. at each epoch): everything back to zero, the loop time starts again."""
        with self._locked():
            self._clear()

    # -- recording --------------------------------------------------------------------------------------------------

    def add_retry(self, count: int = 1) -> None:
        """Counts ``count`` retried calls."""
        with self._locked():
            self._slots[_RETRIES] += count

    def add_wire_bytes(self, nbytes: int) -> None:
        """Counts ``nbytes`` received over gRPC (called by the decoding of each message)."""
        with self._locked():
            self._slots[_WIRE] += nbytes

    def timed(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yields ``iterable``'s items, timing each ``next`` as one wait for data: wrap the training loop's
        iteration, ``for batch in ds.stats.timed(loader): ...``, to see what it waits for even with DataLoader
        workers. Fetches inside are still counted, but not timed twice."""
        with self._locked():
            self._explicit += 1
        try:
            iterator = iter(iterable)
            while True:
                start = self._clock()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                self._record(start, self._clock(), wait=os.getpid() == self._owner)
                yield item
        finally:
            with self._locked():
                self._explicit -= 1
                self._touch(self._clock())

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Fetches made inside (on this thread) count samples and bytes but are no waits: for read-ahead threads,
        whose fetches the loop does not wait for."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def _fetch(self, call: Callable[[], T], count: Callable[[T], tuple[int, int]]) -> T:
        """``call()``, counted by ``count(result)`` -> (samples, bytes) and timed as one wait unless it runs inside
        another fetch, an :meth:`untimed` block or (in this process) a :meth:`timed` loop."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            start = self._clock()
            result = call()
            end = self._clock()
        finally:
            self._local.depth = depth
        wait = depth == 0 and not self._explicit and os.getpid() == self._owner
        self._record(start, end, *count(result), wait=wait)
        return result

    def _stream(self, items: Iterator[T], count: Callable[[T], tuple[int, int]]) -> Iterator[T]:
        """``items``, each counted and its ``next`` timed as one wait (see :meth:`_fetch`)."""
        try:
            while True:
                try:
                    item = self._fetch(lambda: next(items), count)
                except StopIteration:
                    return
                yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            with self._locked():
                self._touch(self._clock())

    def _record(self, start: float, end: float, samples: int = 0, nbytes: int = 0, wait: bool = False) -> None:
        seconds = max(0.0, end - start)
        self._acquire()
        try:
            v = self._slots
            self._touch(start)
            self._touch(end)
            v[_SAMPLES] += samples
            v[_BYTES] += nbytes
            if wait:
                v[_WAITS] += 1
                v[_WAIT_SUM] += seconds
                v[_WAIT_MIN] = min(v[_WAIT_MIN], seconds)
                v[_WAIT_MAX] = max(v[_WAIT_MAX], seconds)
                v[_HIST + _bucket(seconds)] += 1
        finally:
            self._release()

    # -- internals --------------------------------------------------------------------------------------------------

    def _touch(self, t: float) -> None:
        v = self._slots
        v[_FIRST] = t if math.isnan(v[_FIRST]) else min(v[_FIRST], t)
        v[_LAST] = t if math.isnan(v[_LAST]) else max(v[_LAST], t)

    def _clear(self) -> None:
        v = self._values
        v[:] = 0.0
        v[_FIRST] = v[_LAST] = math.nan
        v[_WAIT_MIN], v[_WAIT_MAX] = math.inf, 0.0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def _acquire(self) -> None:
        """Excludes this process's other threads (a lock of its own) and other processes (a POSIX record lock on the
        block, which the system releases when its holder dies: a killed DataLoader worker cannot hang training)."""
        if self._thread_lock_pid != os.getpid():  # forked: the inherited lock may be held by a thread left behind
            self._thread_lock, self._thread_lock_pid = threading.Lock(), os.getpid()
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def _release(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def __getstate__(self) -> dict[str, Any]:
        """While a worker process is being started (spawn, forkserver) the block travels with the object; any other
        pickle (``pickle.dumps(ds)``, ``copy.deepcopy``) holds a detached copy of the numbers."""
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"clock": self._clock, "fd": reduction.DupFd(self._fd), "owner": self._owner}
        with self._locked():
            values = self._values.tolist()
        return {"clock": self._clock, "values": values}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._clock = state["clock"]
        if "fd" in state:
            self._attach(state["fd"].detach(), fresh=False)
            self._owner = state["owner"]
        else:
            self._attach(_shared_fd(), fresh=True)
            self._owner = os.getpid()
            self._values[:] = state["values"]


def _shared_fd() -> int:
    """A descriptor of fresh memory for the counters: a memfd (Linux), else an unlinked temporary file (inherited by
    forked workers all the same, and lockable)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("patchwire-loader-stats", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile(prefix="patchwire-loader-stats-") as f:
        return os.dup(f.fileno())


def _bucket(seconds: float) -> int:
    if seconds <= 0:
        return 0
    index = math.floor((math.log10(seconds) - _LOWEST) * _PER_DECADE) + 1
    return min(max(index, 0), _BUCKETS - 1)


def _percentile(hist: np.ndarray, q: float, lowest: float, highest: float) -> float:
    total = hist.sum()
    if total == 0:
        return math.nan
    index = int(np.searchsorted(np.cumsum(hist), q * total))
    if index == 0:
        return lowest
    middle = 10 ** (_LOWEST + (index - 0.5) / _PER_DECADE)  # geometric middle of the bucket
    return float(min(max(middle, lowest), highest))


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e6:,.1f} MB"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e6:.0f} us"


def recorded(method: F) -> F:
    """Decorates a datasource method that returns samples (a sample, a list of them, or a generator of samples or
    batches) so that ``self.stats`` counts what it returns and times it as waits."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.stats._stream(method(self, *args, **kwargs), received)

        return cast(F, stream)

    @functools.wraps(method)
    def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.stats._fetch(lambda: method(self, *args, **kwargs), received)

    return cast(F, fetch)


def received(result: Any) -> tuple[int, int]:
    """(samples, array bytes) of a sample, a list of samples or a batch (whose ``sample_index`` is an array)."""
    if isinstance(result, list):
        counts = [received(sample) for sample in result]
        return len(counts), sum(nbytes for _, nbytes in counts)
    index = result.get(defs.KEY_SAMPLE_INDEX)
    samples = len(index) if isinstance(index, np.ndarray) else 1
    total = 0
    for key, value in result.items():
        if key == defs.KEY_SAMPLE_INDEX:
            continue
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, list):
            total += sum(v.nbytes for v in value if isinstance(v, np.ndarray))
    return samples, total
