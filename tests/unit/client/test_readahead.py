"""The read-ahead window without a server: a fake fetch that records its calls and can be held or made to fail."""

from __future__ import annotations

import os
import threading

import pytest

from patchwire.client._readahead import ReadAhead

LENGTH = 40


class FakeFetch:
    """Returns ``index * 10`` per index; records every call; ``fail`` makes a call containing that index raise."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.fail: int | None = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, indices: list[int]) -> list[int]:
        self.gate.wait(timeout=10)
        self.calls.append(list(indices))
        if self.fail is not None and self.fail in indices:
            raise KeyError(self.fail)
        return [i * 10 for i in indices]


def make(fetch: FakeFetch, max_samples: int = 8) -> ReadAhead[int]:
    return ReadAhead(fetch, LENGTH, size=lambda _: 4, max_samples=max_samples)


def primed(fetch: FakeFetch, max_samples: int = 8) -> ReadAhead[int]:
    """A window that has seen ``[0, 1], [2, 3], [4, 5]``: the step 2 confirmed, the next batches fetched ahead."""
    window = make(fetch, max_samples)
    for request in ([0, 1], [2, 3], [4, 5]):
        window.get(request)
    return window


def requests(start: int, step: int, batch: int, count: int) -> list[list[int]]:
    return [list(range(start + k * step, start + k * step + batch)) for k in range(count)]


@pytest.mark.parametrize(("step", "batch"), [(2, 2), (4, 2), (1, 1), (6, 3)])
def test_results_are_the_direct_fetch_in_order(step: int, batch: int) -> None:
    fetch = FakeFetch()
    window = make(fetch)
    for request in requests(0, step, batch, LENGTH // step):
        if request[-1] >= LENGTH:
            break
        assert window.get(request) == [i * 10 for i in request]
    window.stop()


def test_a_steady_pattern_is_fetched_ahead_in_fewer_calls_within_the_bound() -> None:
    fetch = FakeFetch()
    window = primed(fetch, max_samples=8)
    ahead = window.ahead
    assert ahead == [(6, 7), (8, 9), (10, 11), (12, 13)]  # 8 samples: the bound
    for request in requests(6, 2, 2, 14):
        window.get(request)
        assert sum(len(b) for b in window.ahead) <= 8
    window.stop()
    direct = 3  # before the pattern was confirmed
    assert len(fetch.calls) < direct + 14  # several predicted batches per call
    fetched = sorted(i for call in fetch.calls for i in call)
    assert len(fetched) == len(set(fetched))  # nothing fetched twice
    assert set(range(34)) <= set(fetched) <= set(range(LENGTH))  # every request; nothing beyond the end


def test_no_prediction_without_a_steady_step() -> None:
    fetch = FakeFetch()
    window = make(fetch)
    for request in ([5, 9], [1, 3], [30, 2], [7, 8]):
        assert window.get(request) == [i * 10 for i in request]
        assert window.ahead == []
    assert fetch.calls == [[5, 9], [1, 3], [30, 2], [7, 8]]


def test_a_request_off_the_pattern_cancels_the_window() -> None:
    fetch = FakeFetch()
    window = primed(fetch)
    assert window.ahead
    fetch.gate.clear()  # whatever is queued ahead stays unfetched until released
    assert window.ahead[0] == (6, 7)
    fetch.gate.set()
    assert window.get([20, 21]) == [200, 210]
    assert window.ahead == []  # one request off the pattern: no prediction until a new step is confirmed
    assert window.get([6, 7]) == [60, 70]
    window.stop()


def test_a_failed_fetch_ahead_is_made_again_directly_by_the_request_that_reaches_it() -> None:
    fetch = FakeFetch()
    fetch.fail = 12
    window = primed(fetch, max_samples=4)  # two batches ahead, refilled one batch at a time
    for request in requests(6, 2, 2, 3):
        assert window.get(request) == [i * 10 for i in request]  # fetched ahead, before and after the failing one
    assert window.ahead[0] == (12, 13)
    failed_ahead = [c for c in fetch.calls if 12 in c]
    assert failed_ahead, "the window had tried it ahead"
    with pytest.raises(KeyError):  # still failing: the direct fetch raises what it raises
        window.get([12, 13])
    assert fetch.calls[-1] == [12, 13]  # ... made again, directly, for exactly that request
    assert window.ahead == []
    fetch.fail = None
    assert window.get([14, 15]) == [140, 150]  # fetched directly again
    window.stop()


def test_a_fetch_ahead_that_failed_once_is_served_by_the_direct_fetch() -> None:
    """An outage during a fetch ahead (which does not retry) costs the consumer nothing once the server is back."""
    fetch = FakeFetch()
    fetch.fail = 12
    window = primed(fetch, max_samples=4)
    for request in requests(6, 2, 2, 3):
        window.get(request)
    assert window.ahead[0] == (12, 13)
    fetch.fail = None  # the server is back
    assert window.get([12, 13]) == [120, 130]
    assert [12, 13] in fetch.calls  # the request, fetched directly (the failed fetch ahead held more)
    window.stop()


def test_stop_ends_the_thread_and_the_next_request_starts_again() -> None:
    fetch = FakeFetch()
    window = primed(fetch)
    threads = [t for t in threading.enumerate() if t.name == "patchwire-readahead"]
    assert threads
    window.stop()
    window.stop()
    assert window.ahead == []
    assert not any(t.is_alive() for t in threads)
    assert window.get([6, 7]) == [60, 70]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_fork_stops_the_thread_and_the_child_starts_empty() -> None:
    fetch = FakeFetch()
    window = primed(fetch)
    assert window.ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an empty window, results still right
        ok = window.ahead == [] and window.get([6, 7]) == [60, 70]
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)
    assert not any(t.name == "patchwire-readahead" for t in threading.enumerate())
    assert window.ahead == []
    assert window.get([6, 7]) == [60, 70]
    window.stop()


def test_from_an_empty_window_the_next_batch_is_fetched_alone_first() -> None:
    """The consumer asks for the next batch at once: it waits for one batch's fetch, not the whole window's."""
    fetch = FakeFetch()
    window = ReadAhead(fetch, LENGTH, size=lambda _: 4, max_samples=8, predict=lambda _: iter([(2, 3), (4, 5), (6, 7)]))
    window.get([0, 1])
    assert window.ahead == [(2, 3), (4, 5), (6, 7)]
    assert window.get([2, 3]) == [20, 30]
    window.stop()
    assert fetch.calls[:3] == [[0, 1], [2, 3], [4, 5, 6, 7]]


def test_from_an_empty_window_the_calls_grow_from_one_batch() -> None:
    fetch = FakeFetch()
    plan = [(i, i + 1) for i in range(2, 32, 2)]
    window = ReadAhead(fetch, LENGTH, size=lambda _: 4, max_samples=32, predict=lambda _: iter(plan))
    window.get([0, 1])
    assert window.ahead == plan
    for request in plan[:3]:
        window.get(list(request))
    window.stop()
    sizes = [len(call) // 2 for call in fetch.calls[1:]]
    assert sizes[:4] == [1, 2, 4, 8], sizes
