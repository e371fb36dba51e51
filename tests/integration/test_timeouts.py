"""No call hangs: a server stopped with SIGSTOP (it accepts connections but answers nothing, not even keepalive
pings) makes a unary call, ``ds[i]`` and a stream each raise DeadlineExceeded naming the server and the call,
under short configured timeouts; a port where nothing listens fails at once with ServerUnavailable."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr

from _servers import serve_process

pytestmark = pytest.mark.slow

SHORT = pw.Timeouts(unary_s=1.0, read_s=1.0, keepalive_s=1.0, keepalive_timeout_s=1.0)


def test_a_stopped_server_ends_every_kind_of_call_with_deadline_exceeded(tiny_h5: Path) -> None:
    with serve_process({"tiny": tiny_h5}) as (process, address), pw.connect(address, timeouts=SHORT) as client:
        ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor())
        assert ds[0]["images"].shape == (24, 16, 2)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            calls = {
                "listing datasets": client.datasets,
                "reading samples [3]": lambda: ds[3],
                "streaming dataset 'tiny'": lambda: next(iter(ds.batches(4, shuffle=True))),
            }
            for what, call in calls.items():
                with pytest.raises(pw.DeadlineExceeded) as info:
                    call()
                assert isinstance(info.value, TimeoutError)
                assert what in str(info.value) and address in str(info.value)
            assert ds.retries == 0  # a wedged server is not retried: that would only double the wait
        finally:
            os.kill(process.pid, signal.SIGCONT)
        ds.close()


def test_a_port_where_nothing_listens_fails_at_once() -> None:
    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(pw.ServerUnavailable) as info:
        pw.connect(f"127.0.0.1:{port}", timeout=600)  # waiting for the timeout would stall the test
    assert f"127.0.0.1:{port}" in str(info.value) and "within" not in str(info.value)


def test_timeouts_reject_what_cannot_be_a_duration() -> None:
    with pytest.raises(ValueError, match="keepalive_s"):
        pw.Timeouts(keepalive_s=0)
    options = dict(pw.Timeouts(keepalive_s=2.5, keepalive_timeout_s=4).channel_options())
    assert options["grpc.keepalive_time_ms"] == 2500 and options["grpc.keepalive_timeout_ms"] == 4000
