"""Restarts are routine for clients: a ``patchwire serve`` with ``--state-dir`` is stopped with SIGTERM (a graceful
stop with the default grace period) while two clients post disjoint shares of one job's predictions, and a new server
is started on the same port and folder. The clients ride through it: every volume comes out exact, every sample is
accepted once (duplicates only from batches sent again), and no client sees an error; a client following events
sees each once, and a status read made while no server listens waits for the new one. A server that stays away
ends the retries with RetriesExhausted once the budget is spent, naming the server and how long it was tried.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.client._retry import Outage

from _checks import Threads
from _servers import serve_process, threaded_server

pytestmark = pytest.mark.slow

WAIT_S = 60  # for events between threads and for processes to exit: a bound, never a pace
JOB = "restart"
ENTRY = "seg"
CHANNELS = 2
SUBJECTS = 3
SUBJECT_SAMPLES = 20  # tiny_h5: 3 subjects of 20x24x16, SliceIndexing along axis 0
SLICE_SHAPE = (24, 16)
BATCH = 3


def _prediction(i: int) -> np.ndarray:
    """The prediction for slice sample ``i``: fixed by ``i`` alone."""
    rng = np.random.default_rng(2000 + i)
    return rng.standard_normal((*SLICE_SHAPE, CHANNELS), dtype=np.float32)


def _batch(indices: Sequence[int]) -> dict[str, np.ndarray]:
    return {ENTRY: np.stack([_prediction(i) for i in indices])}


def _expected(subject: int) -> np.ndarray:
    first = subject * SUBJECT_SAMPLES
    return np.stack([_prediction(i) for i in range(first, first + SUBJECT_SAMPLES)])


def _shares() -> list[list[list[int]]]:
    """Every sample index once, shuffled across subjects, in batches of BATCH; client c posts every other batch."""
    order = [int(i) for i in np.random.default_rng(5).permutation(SUBJECTS * SUBJECT_SAMPLES)]
    batches = [order[k : k + BATCH] for k in range(0, len(order), BATCH)]
    return [batches[0::2], batches[1::2]]


def test_posting_clients_ride_through_a_graceful_restart(tiny_h5: Path, tmp_path: Path) -> None:
    args = ("--state-dir", str(tmp_path / "state"))
    shares = _shares()
    posted_third = threading.Barrier(len(shares) + 3)  # every poster has a third acknowledged, the readers are set up
    server_gone = threading.Event()  # the first server has exited; the second is being started
    stats: dict[int, tuple[int, int, int]] = {}
    events: list[pw.AssemblyEvent] = []
    read_while_down: list[pw.JobStatus] = []
    threads = Threads()

    def post(address: str, c: int, window: int, shared_memory: bool | None) -> None:
        share = shares[c]
        with pw.connect(address) as client:
            ds = client.datasource("tiny", extr.SliceIndexing())
            with client.assembler(
                ds, "average", job_id=JOB, entries={ENTRY: CHANNELS}, window=window, shared_memory=shared_memory
            ) as assembler:
                for k, batch in enumerate(share):
                    if k == len(share) // 3:  # the next third goes out while the server stops (grace period)
                        assembler.flush()
                        posted_third.wait(timeout=WAIT_S)
                    if k == 2 * len(share) // 3:  # the last third while no server listens, then to the new one
                        assert server_gone.wait(timeout=WAIT_S)
                    assembler.add_batch(_batch(batch), batch)
                assembler.flush()
                stats[c] = (assembler.accepted_samples, assembler.duplicate_samples, assembler.resent_batches)

    def follow(address: str) -> None:
        with pw.connect(address) as client:
            ds = client.datasource("tiny", extr.SliceIndexing())
            with client.assembler(ds, "average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
                posted_third.wait(timeout=WAIT_S)
                for event in assembler.events():
                    events.append(event)
                    if event.type == "job_completed":
                        break

    def read_status(address: str) -> None:
        with pw.connect(address) as client:
            ds = client.datasource("tiny", extr.SliceIndexing())
            with client.assembler(ds, "average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
                posted_third.wait(timeout=WAIT_S)
                assert server_gone.wait(timeout=WAIT_S)
                read_while_down.append(assembler.status())

    with serve_process({"tiny": tiny_h5}, args) as (first, address):
        threads.start(lambda: post(address, 0, 1, False))
        threads.start(lambda: post(address, 1, 3, None))
        threads.start(lambda: follow(address))
        threads.start(lambda: read_status(address))
        posted_third.wait(timeout=WAIT_S)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=WAIT_S) == 0
        server_gone.set()
        port = address.rsplit(":", 1)[1]
        with serve_process({"tiny": tiny_h5}, (*args, "--port", port)) as (_, again):
            assert again == address
            threads.join(WAIT_S * 3)
            with pw.connect(address) as client:
                status = client.job_status(JOB)
                ds = client.datasource("tiny", extr.SliceIndexing())
                with client.assembler(ds, "average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
                    volumes = [assembler.get_assembled_subject(s)[ENTRY] for s in range(SUBJECTS)]

    assert (status.state, status.expected, status.received, status.ready_subject_count) == ("completed", 60, 60, 3)
    assert [s.received for s in status.subjects] == [SUBJECT_SAMPLES] * SUBJECTS
    for subject, volume in enumerate(volumes):
        assert volume.dtype == np.float32
        np.testing.assert_array_equal(volume, _expected(subject))
    for c, share in enumerate(shares):
        accepted, duplicates, resent = stats[c]
        assert accepted == sum(len(b) for b in share)  # each sample accepted once
        assert duplicates <= resent * BATCH  # duplicates only from batches sent again
    assert sum(resent for _, _, resent in stats.values()) >= 1  # the clients did meet the outage
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert sorted(e.subject_index for e in events if e.type == "subject_ready") == list(range(SUBJECTS))
    assert [e.type for e in events][-1] == "job_completed"
    (during,) = read_while_down
    assert during.job_id == JOB and during.expected == 60 and during.journalled


def test_a_server_that_stays_away_ends_the_retries_with_a_clear_error(tiny_h5: Path) -> None:
    budget = pw.RetryPolicy(budget_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.2)
    with threaded_server({"tiny": tiny_h5}) as handle, pw.connect(handle.server.address) as client:
        address = handle.server.address
        ds = client.datasource("tiny", extr.SliceIndexing())
        assembler = client.assembler(ds, job_id="away", entries={ENTRY: CHANNELS}, retry=budget)
        assembler.add_batch(_batch([0, 1]), [0, 1])
        handle.submit(handle.server.stop(0)).result(timeout=WAIT_S)
        for call in (lambda: assembler.add_batch(_batch([2, 3]), [2, 3]), assembler.status, lambda: assembler.fetch(0)):
            with pytest.raises(pw.RetriesExhausted) as info:
                call()
            error = info.value
            assert isinstance(error, pw.ConnectionFailed)
            assert error.address == address and address in str(error)
            assert 1.0 <= error.elapsed_s < 1.0 + WAIT_S
            assert error.attempts >= 2
            assert "gave up after 1." in str(error) and "UNAVAILABLE" in str(error)
        assembler.close()
        ds.close()


def test_waits_grow_exponentially_with_full_jitter_within_the_budget() -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    policy = pw.RetryPolicy(budget_s=10.0, initial_backoff_s=0.1, max_backoff_s=2.0)
    outage = Outage(policy, "host:1", "posting", clock=lambda: now[0], sleep=sleep, rng=random.Random(3))
    failure = pw.ConnectionFailed("down")
    with pytest.raises(pw.RetriesExhausted) as info:
        while True:
            outage.failed(failure)
    bounds = [policy.bound(k) for k in range(1, len(waits) + 1)]
    assert bounds[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert all(0 <= w <= b for w, b in zip(waits, bounds, strict=True))
    assert len(set(waits)) == len(waits)  # jittered, not a fixed schedule
    assert sum(waits) == pytest.approx(10.0)  # the last wait is cut to the budget, then one last attempt
    assert info.value.elapsed_s == pytest.approx(10.0) and info.value.attempts == len(waits) + 1
    assert info.value.__cause__ is failure


def test_a_retry_policy_is_checked() -> None:
    assert pw.RetryPolicy().budget_s >= 60  # covers the default grace period (5 s) plus a restart
    bad: list[dict[str, Any]] = [{"budget_s": -1}, {"initial_backoff_s": 0}, {"max_backoff_s": 0.01}]
    for kwargs in bad:
        with pytest.raises(ValueError, match="RetryPolicy"):
            pw.RetryPolicy(**kwargs)
