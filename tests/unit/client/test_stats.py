"""LoaderStats with an injected clock: counts, waits, percentiles, reset, the summary, threads, pickling and fork."""

from __future__ import annotations

import copy
import math
import multiprocessing
import pickle
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from patchwire.client import LoaderStats
from patchwire.client._stats import INPUT_BOUND_THRESHOLD, received, recorded


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A datasource stand-in whose fetches take ``fetch_s`` on the injected clock."""

    def __init__(self, clock: Clock, fetch_s: float = 0.01) -> None:
        self.clock, self.fetch_s = clock, fetch_s
        self.stats = LoaderStats(clock)

    @recorded
    def get_samples(self, indices: list[int]) -> list[dict[str, object]]:
        self.clock.now += self.fetch_s
        return [{"images": np.zeros(4, np.float32), "sample_index": i} for i in indices]

    @recorded
    def batches(self, count: int, batch_size: int) -> Iterator[dict[str, object]]:
        for b in range(count):
            self.clock.now += self.fetch_s
            yield {"images": np.zeros((batch_size, 4), np.float32), "sample_index": np.arange(batch_size) + b}


def test_a_stream_counts_samples_bytes_and_waits() -> None:
    clock = Clock()
    source = Source(clock, fetch_s=0.01)
    for _ in source.batches(5, batch_size=3):
        clock.now += 0.03  # the training step
    s = source.stats.snapshot()
    assert (s.samples, s.bytes, s.waits) == (15, 15 * 16, 5)
    assert s.wait_seconds == pytest.approx(0.05) and s.loop_seconds == pytest.approx(0.2)
    assert s.wait_fraction == pytest.approx(0.25) and s.input_bound
    assert s.p50 == pytest.approx(0.01, rel=0.06) and s.p99 == pytest.approx(0.01, rel=0.06)


def test_fetches_are_waits_and_nested_fetches_are_timed_once() -> None:
    clock = Clock()
    source = Source(clock, fetch_s=0.002)
    source.get_samples([0, 1])
    clock.now += 0.1
    with source.stats.untimed():  # a read-ahead thread's fetch: counted, no wait
        source.get_samples([2])
    s = source.stats.snapshot()
    assert (s.samples, s.waits) == (3, 1) and s.wait_seconds == pytest.approx(0.002)
    assert s.loop_seconds == pytest.approx(0.104) and not s.input_bound


def test_percentiles_from_the_histogram() -> None:
    clock = Clock()
    stats = LoaderStats(clock)
    waits = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms

    def slow() -> Iterator[int]:
        for w in waits:
            clock.now += w
            yield 0

    assert sum(1 for _ in stats.timed(slow())) == 100
    s = stats.snapshot()
    assert s.waits == 100 and s.wait_seconds == pytest.approx(sum(waits))
    assert s.p50 == pytest.approx(0.050, rel=0.07)
    assert s.p90 == pytest.approx(0.090, rel=0.07)
    assert s.p99 == pytest.approx(0.099, rel=0.07)
    assert len(stats._values) < 200  # the histogram is fixed: memory does not grow with the epoch


def test_timed_loop_takes_over_from_the_fetches_inside_it() -> None:
    clock = Clock()
    source = Source(clock, fetch_s=0.01)
    for _ in source.stats.timed(source.batches(4, batch_size=2)):
        clock.now += 0.09
    s = source.stats.snapshot()
    assert (s.samples, s.waits) == (8, 4) and s.wait_seconds == pytest.approx(0.04)
    assert s.loop_seconds == pytest.approx(0.4) and s.wait_fraction == pytest.approx(0.1) and not s.input_bound


def test_reset_starts_afresh() -> None:
    clock = Clock()
    source = Source(clock)
    source.get_samples([0])
    source.stats.add_retry()
    source.stats.reset()
    s = source.stats.snapshot()
    assert (s.samples, s.bytes, s.retries, s.waits, s.loop_seconds) == (0, 0, 0, 0, 0.0)
    assert math.isnan(s.p50)
    clock.now += 50
    source.get_samples([1])
    assert source.stats.snapshot().loop_seconds == pytest.approx(0.01)


def test_summary_text() -> None:
    clock = Clock()
    source = Source(clock, fetch_s=0.004)
    assert source.stats.summary() == "0 samples, 0.0 MB, 0 retries; no waits timed in this process " + (
        "(iterate through stats.timed(loader))"
    )
    for _ in source.batches(3, batch_size=1000):
        clock.now += 0.001
    source.stats.add_retry(2)
    assert source.stats.summary() == (
        "waited for data 80% of 15 ms (p50 4 ms, p90 4 ms, p99 4 ms per wait), 3,000 samples, 0.0 MB, 2 retries: "
        "input-bound"
    )
    assert 0 < INPUT_BOUND_THRESHOLD < 0.8


def test_received_counts_samples_and_array_bytes() -> None:
    sample = {"images": np.zeros((2, 3), np.float64), "labels": [np.zeros(2, np.uint8)], "sample_index": 7}
    assert received(sample) == (1, 50)
    assert received([sample, sample]) == (2, 100)
    assert received({"images": np.zeros((3, 2), np.float32), "sample_index": np.arange(3)}) == (3, 24)


def test_threads_lose_no_counts() -> None:
    stats = LoaderStats(Clock())

    def work() -> None:
        for _ in range(500):
            stats._record(0.0, 0.0, samples=1, nbytes=2, wait=True)
            stats.add_retry()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = stats.snapshot()
    assert (s.samples, s.bytes, s.retries, s.waits) == (2000, 4000, 2000, 2000)


def test_a_pickled_copy_is_detached() -> None:
    stats = LoaderStats(Clock())
    stats._record(100.0, 100.5, samples=3, nbytes=12, wait=True)
    for copied in (pickle.loads(pickle.dumps(stats)), copy.deepcopy(stats)):
        assert copied.snapshot() == stats.snapshot()
        copied.add_retry()
        assert (copied.snapshot().retries, stats.snapshot().retries) == (1, 0)


def _fetch_in_child(stats: LoaderStats) -> None:
    stats._fetch(lambda: [{"images": np.zeros(10, np.float32), "sample_index": i} for i in range(5)], received)
    stats.add_retry()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes_add_to_the_parents_counts_but_not_its_waits(method: str) -> None:
    stats = LoaderStats()  # the default clock: a spawned child cannot unpickle a test's local class
    context = multiprocessing.get_context(method)
    child = context.Process(target=_fetch_in_child, args=(stats,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    s = stats.snapshot()
    assert (s.samples, s.bytes, s.retries) == (5, 200, 1)
    assert s.waits == 0 and s.loop_seconds >= 0  # a worker's fetch is no wait of the training loop
