"""Read-ahead for map-style access: the requests a loader will make next, fetched by a background thread.

A DataLoader over a map-style dataset asks for one batch of indices after another. When the last three requests
were each the one before shifted by the same step (``[0, 1], [2, 3], [4, 5]``; a DataLoader worker that gets every
k-th batch: ``[0, 1], [4, 5], [8, 9]``), the next ones are predicted by that step and fetched ahead, several batches
in one call, so the consumer finds them ready (from an empty window in jobs that grow from one batch, 1, 2, 4, ...
batches, so that the next batch does not wait for a whole window's fetch). The window is bounded (``max_samples``
and ``max_bytes`` of samples held ahead, estimated from the samples already received); it is refilled when half of it
is consumed. A request that is not the predicted next one cancels the window and is fetched directly. A fetch ahead
that fails (``fetch_ahead`` should not retry: nobody waits for it yet, and a thread retrying a speculative read through
an outage would outlive its window) cancels the window, and the request that reaches it is fetched directly with
``fetch``, which retries as every read does and raises what it raises. Results are the fetch function's, in request
order.

An explicit prediction (``predict``, e.g. a shuffled DataLoader's order, see ``_shuffle_order``) is asked for the
batches to come after each request that was not predicted; while it holds, its batches are fetched ahead instead of
the step's. It is verified the same way: the first request that is not its next batch cancels it.

Each process predicts from its own requests only. The thread is stopped before any ``fork()`` (an ``os`` fork hook,
registered after the connection's so it runs first: no thread is inside gRPC when channels are closed and the
process forks) and restarted on the next request; a forked child starts with an empty window and no thread.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from patchwire.client import _connection  # noqa: F401  # its fork hook first, so this module's runs before it

__all__ = ["ReadAhead", "sample_bytes"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: Most samples held ahead of the consumer.
MAX_SAMPLES = 64
#: Most bytes of samples held ahead of the consumer (estimated from the samples received so far). Measured with
#: DataLoader workers, which start afresh every epoch: a window's bytes are fresh pages in each new worker (its
#: segment, its buffers), and 64 MiB cost more in page faults than the window saved (64^3 patches: 0.90-0.95x pymia
#: with 64 MiB, 0.96-1.04x with 24 MiB; no change without workers).
MAX_BYTES = 24 << 20
_STOP_TIMEOUT_S = 30.0

_live: weakref.WeakSet[ReadAhead[object]] = weakref.WeakSet()


class _Job(Generic[T]):
    """One fetch ahead: several predicted batches in one call."""

    def __init__(self, batches: list[tuple[int, ...]]) -> None:
        self.batches = batches
        self.results: list[list[T] | None] = []
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()


class _Slot(Generic[T]):
    def __init__(self, indices: tuple[int, ...], job: _Job[T], k: int) -> None:
        self.indices, self.job, self.k = indices, job, k


def sample_bytes(sample: dict[str, Any]) -> int:
    """The bytes of a sample's arrays (what a window of samples holds)."""
    return sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray))


def _shift(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """The step s with ``b == a + s`` elementwise, or None."""
    if len(a) != len(b) or not a:
        return None
    step = b[0] - a[0]
    return step if all(y - x == step for x, y in zip(a, b, strict=True)) else None


class ReadAhead(Generic[T]):
    """``get(indices)`` returns ``fetch(indices)``, fetched ahead where the request was predicted.

    ``fetch(indices)`` returns one result per index, in order; ``size(result)`` its bytes (for the window's bound);
    ``length`` bounds predictions to ``range(length)``; ``fetch_ahead`` (default ``fetch``) is what the background
    thread calls (e.g. a fetch that the loop's statistics do not count as a wait); ``predict(request)``, called
    with each request that was not predicted, returns the batches expected after it (or None: the step decides).
    """

    def __init__(
        self,
        fetch: Callable[[list[int]], list[T]],
        length: int,
        size: Callable[[T], int],
        max_samples: int = MAX_SAMPLES,
        max_bytes: int = MAX_BYTES,
        fetch_ahead: Callable[[list[int]], list[T]] | None = None,
        predict: Callable[[tuple[int, ...]], Iterator[tuple[int, ...]] | None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._fetch_ahead = fetch_ahead or fetch
        self._predict = predict
        self._length = length
        self._size = size
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self._reset()
        _live.add(self)  # type: ignore[arg-type]

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._history: collections.deque[tuple[int, ...]] = collections.deque(maxlen=3)
        self._ahead: collections.deque[_Slot[T]] = collections.deque()
        self._jobs: queue.SimpleQueue[_Job[T] | None] | None = None
        self._thread: threading.Thread | None = None
        self._sample_bytes = 0
        self._plan: Iterator[tuple[int, ...]] | None = None

    @property
    def ahead(self) -> list[tuple[int, ...]]:
        """The batches fetched or being fetched ahead, in the order they are expected."""
        return [slot.indices for slot in self._ahead]

    def get(self, indices: Sequence[int]) -> list[T]:
        if self._pid != os.getpid():  # a forked child: nothing of the parent's window is valid here
            self._reset()
        key = tuple(int(i) for i in indices)
        with self._lock:
            if self._ahead and self._ahead[0].indices == key:
                out = self._take(self._ahead.popleft())
            else:
                self._cancel()
                out = self._fetch(list(key))
                if self._predict is not None:
                    self._plan = self._predict(key)
            if out and not self._sample_bytes:
                self._sample_bytes = max(1, sum(self._size(r) for r in out) // len(out))
            self._history.append(key)
            self._top_up()
            return out

    def _take(self, slot: _Slot[T]) -> list[T]:
        slot.job.done.wait()
        if slot.job.error is not None:  # fetched again, directly: with the reader's retries, raising what it raises
            self._cancel()
            return self._fetch(list(slot.indices))
        out = slot.job.results[slot.k]
        slot.job.results[slot.k] = None  # the window holds only what is still ahead
        assert out is not None
        return out

    def _step(self) -> int | None:
        if len(self._history) < 3:
            return None
        first, second, third = self._history
        step = _shift(first, second)
        return step if step and step == _shift(second, third) else None

    def _top_up(self) -> None:
        step = self._step()
        if step is None and self._plan is None:
            return
        batch = len(self._history[-1])
        window = max(1, min(self.max_samples, self.max_bytes // max(1, self._sample_bytes)) // batch)
        if len(self._ahead) > window // 2:
            return
        tail = self._ahead[-1].indices if self._ahead else self._history[-1]
        batches: list[tuple[int, ...]] = []
        while len(self._ahead) + len(batches) < window:
            if self._plan is not None:
                tail = next(self._plan, ())
            else:
                assert step is not None
                tail = tuple(i + step for i in tail)
            if not tail or not all(0 <= i < self._length for i in tail):
                break
            batches.append(tail)
        if not batches:
            return
        # from an empty window the jobs grow from one batch (1, 2, 4, ...): the consumer asks for the next batch at
        # once and waits for the whole job that holds it
        jobs = [batches]
        if not self._ahead:
            jobs, size = [], 1
            while batches:
                jobs.append(batches[:size])
                batches, size = batches[size:], 2 * size
        for part in jobs:
            job: _Job[T] = _Job(part)
            self._ahead.extend(_Slot(b, job, k) for k, b in enumerate(part))
            self._submit(job)

    def _submit(self, job: _Job[T]) -> None:
        if self._thread is None:
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._work, args=(self._jobs,), name="patchwire-readahead", daemon=True
            )
            self._thread.start()
        assert self._jobs is not None
        self._jobs.put(job)

    def _work(self, jobs: queue.SimpleQueue[_Job[T] | None]) -> None:
        while (job := jobs.get()) is not None:
            if not job.cancelled:
                try:
                    flat = self._fetch_ahead([i for b in job.batches for i in b])
                    start = 0
                    for b in job.batches:
                        job.results.append(flat[start : start + len(b)])
                        start += len(b)
                except BaseException as exc:  # the request that reaches this job fetches it again, directly
                    job.error = exc
            job.done.set()

    def _cancel(self) -> None:
        self._plan = None
        for slot in self._ahead:
            slot.job.cancelled = True
        self._ahead.clear()

    def stop(self) -> None:
        """Cancels the window and ends the thread (idempotent); the next request starts again from scratch."""
        if self._pid != os.getpid():
            return
        with self._lock:
            self._cancel()
            self._history.clear()
            thread, jobs, self._thread, self._jobs = self._thread, self._jobs, None, None
            if thread is not None and jobs is not None:
                jobs.put(None)
                thread.join(timeout=_STOP_TIMEOUT_S)
                if thread.is_alive():
                    logger.warning("a read-ahead fetch did not end within %g s", _STOP_TIMEOUT_S)


def _before_fork() -> None:
    for read_ahead in list(_live):
        read_ahead.stop()


os.register_at_fork(before=_before_fork)
