"""The calls a server has open, on a real server: ListStreams shows an open stream with its request id and growing
counters; request ids are taken from clients when safe, assigned otherwise, echoed in the trailing metadata and put on
the call's log records; a server of several processes reads its siblings' published tables."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from patchwire.service import _metrics
from patchwire.service._calls import MAX_REQUEST_ID_CHARS, REQUEST_ID_KEY, STALE_AFTER_S, CallTable, request_id_of
from patchwire.v1 import (
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    server_service_pb2,
    server_service_pb2_grpc,
)
from patchwire.wire import framing

from _checks import eventually, expect_raw
from _servers import ThreadedServer, slices_spec, threaded_server

RPC_TIMEOUT_S = 30
HEX16 = re.compile(r"[0-9a-f]{16}")


@pytest.fixture
def served(tiny_h5: Path) -> Iterator[ThreadedServer]:
    with threaded_server({"tiny": tiny_h5}) as handle:
        yield handle


@pytest.fixture
def channel(served: ThreadedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.server.address, options=framing.channel_options()) as opened:
        yield opened


def list_streams(channel: grpc.Channel) -> server_service_pb2.ListStreamsResponse:
    stub = server_service_pb2_grpc.ServerServiceStub(channel)
    return stub.ListStreams(server_service_pb2.ListStreamsRequest(), timeout=RPC_TIMEOUT_S)


def samples_of(message: Any) -> int:
    return len(message.batch.sample_indices) if message.HasField("batch") else 0


def test_list_streams_shows_an_open_stream_with_growing_counters(served: ThreadedServer, channel: grpc.Channel) -> None:
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    # a long epoch of weighted draws: far more than gRPC's buffers hold, so the server waits for this reader
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=slices_spec(), batch_size=4, sample_weights=[1.0] * 60, samples_per_epoch=1 << 20
    )
    call = datasets.StreamBatches(request, timeout=RPC_TIMEOUT_S, metadata=[(REQUEST_ID_KEY, "growing-1")])
    try:
        received = samples_of(next(call))
        first = list_streams(channel)
        (stream,) = first.streams  # (the ListStreams call itself is left out)
        assert (stream.request_id, stream.method) == ("growing-1", "/patchwire.v1.DatasetService/StreamBatches")
        assert (stream.dataset, stream.pattern, stream.identity) == ("tiny", "slice", "anonymous")
        assert stream.peer.startswith("ipv4:127.0.0.1:") and stream.worker_index == 0
        assert stream.stream_id.startswith("0.")
        assert stream.started_unix <= first.time_unix and first.replica_id == served.server.config.replica_id
        assert stream.samples >= received >= 1 and stream.bytes > 0
        while received <= stream.samples:  # read beyond what the server had counted: it must have sent more
            received += samples_of(next(call))
        (later,) = list_streams(channel).streams
        assert later.stream_id == stream.stream_id
        assert later.samples >= received > stream.samples and later.bytes > stream.bytes
        assert later.work_seconds > 0 and later.wait_seconds >= 0
    finally:
        call.cancel()
    eventually(lambda: list_streams(channel).streams, lambda streams: len(streams) == 0)


def test_a_stream_written_with_context_write_is_observed_too(channel: grpc.Channel) -> None:
    """gRPC's health Watch writes its responses instead of yielding them."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S, metadata=[(REQUEST_ID_KEY, "watch-1")]
    )
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        (listed,) = list_streams(channel).streams
        assert (listed.method, listed.request_id) == ("/grpc.health.v1.Health/Watch", "watch-1")
    finally:
        watch.cancel()
    eventually(lambda: list_streams(channel).streams, lambda streams: len(streams) == 0)


def test_the_request_id_is_the_clients_when_safe_and_echoed(channel: grpc.Channel) -> None:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)

    def echoed(metadata: list[tuple[str, str]]) -> str:
        _, call = stub.ListDatasets.with_call(
            dataset_service_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT_S, metadata=metadata
        )
        (value,) = [v for k, v in call.trailing_metadata() if k == REQUEST_ID_KEY]
        return str(value)

    assert echoed([(REQUEST_ID_KEY, "trainer-7.epoch:3_b-1")]) == "trainer-7.epoch:3_b-1"
    assert echoed([(REQUEST_ID_KEY, "x" * MAX_REQUEST_ID_CHARS)]) == "x" * MAX_REQUEST_ID_CHARS
    for unsafe in ("x" * (MAX_REQUEST_ID_CHARS + 1), "has spaces", "new\\nline", "quote'"):
        assert HEX16.fullmatch(echoed([(REQUEST_ID_KEY, unsafe)]))
    first, second = echoed([]), echoed([])
    assert HEX16.fullmatch(first) and HEX16.fullmatch(second) and first != second
    # a refused call echoes it too
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenDatasource(
            dataset_service_pb2.OpenDatasourceRequest(spec={"dataset": "nope"}),
            timeout=RPC_TIMEOUT_S,
            metadata=[(REQUEST_ID_KEY, "refused-1")],
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert (REQUEST_ID_KEY, "refused-1") in info.value.trailing_metadata()  # type: ignore[attr-defined]


def test_log_records_of_a_call_carry_its_request_id(channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    with caplog.at_level(logging.DEBUG, logger="patchwire"):
        with expect_raw(grpc.StatusCode.NOT_FOUND, "nope"):
            stub.OpenDatasource(
                dataset_service_pb2.OpenDatasourceRequest(spec={"dataset": "nope"}),
                timeout=RPC_TIMEOUT_S,
                metadata=[(REQUEST_ID_KEY, "logged-1")],
            )

        def mine() -> list[logging.LogRecord]:
            return [r for r in caplog.records if getattr(r, "request_id", None) == "logged-1"]

        # the refusal, and the call's end (logged once its status is on its way)
        records = eventually(mine, lambda found: {"WARNING", "DEBUG"} <= {r.levelname for r in found})
    for record in records:
        assert record.method == "/patchwire.v1.DatasetService/OpenDatasource"  # type: ignore[attr-defined]
        assert record.identity == "anonymous"  # type: ignore[attr-defined]
        assert record.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    outside = logging.getLogger("patchwire.test").makeRecord("patchwire.test", logging.INFO, "f", 1, "m", (), None)
    assert not hasattr(outside, "request_id")


def test_request_id_of_bounds_what_it_takes() -> None:
    assert request_id_of([("other", "x"), (REQUEST_ID_KEY, b"bytes-id")]) == "bytes-id"
    assert HEX16.fullmatch(request_id_of(None))
    assert HEX16.fullmatch(request_id_of([(REQUEST_ID_KEY, "")]))


# -- several processes ------------------------------------------------------------------------------------------------

_SIBLING = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from patchwire.service._calls import CallTable

    class Context:
        def invocation_metadata(self): return (("x-request-id", "sibling-1"),)
        def peer(self): return "ipv4:10.0.0.9:4242"
        def set_trailing_metadata(self, metadata): pass

    table = CallTable(1, Path(sys.argv[1]))
    call = table.open("/patchwire.v1.DatasetService/StreamBatches", Context())
    call.dataset, call.pattern, call.identity = "tiny", "patch", "alice"
    call.samples, call.bytes, call.wait_seconds, call.work_seconds = 12, 3456, 0.5, 1.5
    table.publish()
    print(os.getpid())
    """
)


def test_list_streams_reads_the_tables_sibling_processes_publish(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pid = int(
        subprocess.run(
            [sys.executable, "-c", _SIBLING, str(run_dir)], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    )
    table = CallTable(0, run_dir)
    (sibling,) = table.snapshot()
    assert (sibling.stream_id, sibling.request_id, sibling.worker_index) == ("1.1", "sibling-1", 1)
    assert (sibling.identity, sibling.peer, sibling.dataset, sibling.pattern) == (
        "alice",
        "ipv4:10.0.0.9:4242",
        "tiny",
        "patch",
    )
    assert (sibling.samples, sibling.bytes, sibling.wait_seconds, sibling.work_seconds) == (12, 3456, 0.5, 1.5)
    # this process's own table is published too, and never read back from its file
    table.publish()
    assert (run_dir / "streams" / f"{os.getpid()}.json").is_file()
    assert len(table.snapshot()) == 1
    # a table not rewritten for a while belongs to a process that ended or hangs
    published = run_dir / "streams" / f"{pid}.json"
    old = time.time() - STALE_AFTER_S - 1
    os.utime(published, (old, old))
    assert table.snapshot() == []
    # the supervisor forgets a process that ended
    _metrics.process_exited(pid, run_dir)
    assert not published.exists()
    # a file that is not a table is skipped
    (run_dir / "streams" / "999999.json").write_text("{not json")
    assert table.snapshot() == []
