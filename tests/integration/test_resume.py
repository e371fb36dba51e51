"""A batch stream survives a server restart: ``patchwire serve`` is killed mid-epoch and started again on the same
port while a client streams a shuffled epoch; the stream is retried and resumes at its cursor, so every sample
index arrives exactly once, and the retries are counted. Calls the client ends (cancelled or abandoned streams,
reads past their deadline) leave no ERROR and no traceback in the server's log."""

from __future__ import annotations

import logging
import signal
from collections import Counter
from pathlib import Path

import pytest

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr

from _datasets import make_pymia_dataset
from _servers import serve_process, threaded_server

pytestmark = pytest.mark.slow

WAIT_S = 60  # for processes to exit: a bound, never a pace
SHAPE = (32, 128, 128)  # 96 slices of ~160 KB: the epoch is far larger than what the connection buffers


@pytest.fixture(scope="module")
def large_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pymia_dataset(tmp_path_factory.mktemp("large"), shape=SHAPE)


def test_a_stream_resumes_at_its_cursor_after_a_restart(large_h5: Path) -> None:
    retry = pw.RetryPolicy(budget_s=WAIT_S, initial_backoff_s=0.05, max_backoff_s=0.5)
    seen: Counter[int] = Counter()
    with serve_process({"large": large_h5}) as (first, address), pw.connect(address) as client:
        ds = client.datasource("large", extr.SliceIndexing(), extr.DataExtractor(), retry=retry)
        batches = ds.batches(2, shuffle=True, seed=11, prefetch=0)
        seen.update(int(i) for i in next(batches)[defs.KEY_SAMPLE_INDEX])
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=WAIT_S) == -signal.SIGKILL
        port = address.rsplit(":", 1)[1]
        with serve_process({"large": large_h5}, ("--port", port)) as (_, again):
            assert again == address
            for batch in batches:
                seen.update(int(i) for i in batch[defs.KEY_SAMPLE_INDEX])
            assert ds.retries >= 1
        ds.close()
    assert sorted(seen) == list(range(len(ds))) and set(seen.values()) == {1}


def test_calls_the_client_ended_are_not_server_errors(tiny_h5: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with threaded_server({"tiny": tiny_h5}) as handle:
        with pw.connect(handle.server.address) as client:
            ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor())
            for prefetch in (0, 2):
                cancelled = ds.batches(1, prefetch=prefetch)
                next(cancelled)
                cancelled.close()  # cancelled early
                abandoned = ds.batches(1, prefetch=prefetch)
                next(abandoned)
                ds.close()  # the client disconnects under an open stream, never to read it again
                del abandoned
            late = client.datasource(
                "tiny", extr.SliceIndexing(), extr.DataExtractor(), timeouts=pw.Timeouts(read_s=1e-3)
            )
            with pytest.raises(pw.DeadlineExceeded):  # (3,000 samples take the server far longer than 1 ms)
                late.get_samples(list(range(60)) * 50)
            late.close()
            assert len(ds.get_samples([0, 1])) == 2  # the server still serves
            ds.close()
        handle.submit(handle.server.stop(0.5)).result(timeout=WAIT_S)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any("Traceback" in r.getMessage() for r in caplog.records)
    assert any("ended by the client" in r.getMessage() for r in caplog.records)  # said quietly, once per call
