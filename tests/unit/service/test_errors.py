"""The server's error boundary without a server: what a client ending a stream is logged as."""

from __future__ import annotations

import logging

import pytest

from patchwire.service._errors import quiet_client_endings


def test_a_stream_whose_client_is_gone_is_said_at_debug_not_error(caplog: pytest.LogCaptureFixture) -> None:
    quiet_client_endings()
    quiet_client_endings()  # idempotent
    caplog.set_level(logging.DEBUG)
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    assert len(grpc_log.filters) == 1
    grpc_log.error("ExecuteBatchError raised in core by servicer method [/patchwire.v1.DatasetService/StreamBatches]")
    grpc_log.error("something else went wrong")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["something else went wrong"], "only the client's ending is quietened"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("/patchwire.v1.DatasetService/StreamBatches: stream ended by the client" in m for m in debug), debug
