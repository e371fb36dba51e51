"""Metrics, ListStreams and JSON logs of a real ``patchwire serve --workers 2``: one metrics endpoint counts what
every worker served (reads through shared memory, which the home process serves for the others, included);
ListStreams answers with the streams of both workers, whichever one is asked; log lines of a refused call carry the
client's request id, whichever worker wrote them. Connections are made to land on chosen workers (each channel gets a
TCP connection of its own; GetServerInfo names the worker that holds it)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from _metrics_scrape import scrape, value

import patchwire.client as pw
from patchwire.cli.launch import Launched, launched, serve_command
from patchwire.client import _connection
from patchwire.client import extraction as extr
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, server_service_pb2_grpc
from patchwire.v1 import server_service_pb2 as spb
from patchwire.wire import framing

from _checks import eventually
from _servers import child_env, slices_spec

WORKERS = 2
TIMEOUT_S = 30
T = TypeVar("T")
SERVED = "patchwire_served_samples_total"
SLICES = {"dataset": "tiny", "identity": "anonymous", "pattern": "slice"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_h5: Path) -> Iterator[tuple[Launched, int]]:
    port = free_port()
    command = serve_command({"tiny": tiny_h5}, "--workers", str(WORKERS), "--metrics-port", str(port))
    command[command.index("serve") : command.index("serve")] = ["--log-format", "json"]
    with launched(command, env=child_env()) as started:
        yield started, port


@pytest.fixture(autouse=True)
def own_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client channel gets a TCP connection of its own, so that connections spread over the workers."""
    monkeypatch.setattr(
        _connection, "RECONNECT_OPTIONS", [*_connection.RECONNECT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )


def raw_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[*framing.channel_options(), ("grpc.use_local_subchannel_pool", 1)])


def worker_of(channel: grpc.Channel) -> int:
    info = server_service_pb2_grpc.ServerServiceStub(channel).GetServerInfo(spb.GetServerInfoRequest(), timeout=30)
    return int(info.worker_index)


def landing_on(worker: int, make: Callable[[], T], channel_of: Callable[[T], grpc.Channel], close: Any) -> T:
    for _ in range(64):
        made = make()
        if worker_of(channel_of(made)) == worker:
            return made
        close(made)
    raise AssertionError(f"no connection reached worker {worker} in 64 tries")


def raw_on(address: str, worker: int) -> grpc.Channel:
    return landing_on(worker, lambda: raw_channel(address), lambda c: c, lambda c: c.close())


def test_one_endpoint_counts_what_every_worker_served(server: tuple[Launched, int]) -> None:
    launched_server, port = server
    before = value(scrape(port), SERVED, **SLICES)
    for worker in range(WORKERS):
        channel = raw_on(launched_server.address, worker)
        try:
            request = dataset_service_pb2.StreamBatchesRequest(spec=slices_spec(), batch_size=4)
            stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            assert sum(len(m.batch.sample_indices) for m in stub.StreamBatches(request, timeout=TIMEOUT_S)) == 60
        finally:
            channel.close()
    # reads through shared memory on worker 1 are served by the home process (worker 0) for it
    address = launched_server.address
    client = landing_on(1, lambda: pw.connect(address), lambda c: c._connection.channel, pw.Client.close)
    try:
        ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(("images",)))
        assert len(ds.get_samples([3, 7, 11])) == 3
        assert ds.uses_shared_memory
    finally:
        client.close()
    # workers' files are summed at every scrape: what each counted is there once it has counted it
    eventually(
        lambda: value(scrape(port), SERVED, **SLICES) - before, lambda grown: grown == 2 * 60 + 3, timeout_s=30.0
    )
    metrics = scrape(port)
    assert value(metrics, "patchwire_rpc_handled_total", method="StreamBatches", code="OK") >= 2
    assert value(metrics, "patchwire_cache_capacity_bytes") == WORKERS * (1 << 30)  # one cache per worker


def test_list_streams_answers_with_every_workers_streams(server: tuple[Launched, int]) -> None:
    launched_server, _ = server
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=slices_spec(), batch_size=4, sample_weights=[1.0] * 60, samples_per_epoch=1 << 20
    )
    channels = [raw_on(launched_server.address, worker) for worker in range(WORKERS)]
    calls = []
    try:
        for worker, channel in enumerate(channels):
            call = dataset_service_pb2_grpc.DatasetServiceStub(channel).StreamBatches(
                request, timeout=TIMEOUT_S, metadata=[("x-request-id", f"on-worker-{worker}")]
            )
            next(call)
            calls.append(call)
        for asked in channels:  # either worker answers with both streams (a sibling's within a second)

            def listed(asked: grpc.Channel = asked) -> dict[str, int]:
                answer = server_service_pb2_grpc.ServerServiceStub(asked).ListStreams(
                    spb.ListStreamsRequest(), timeout=TIMEOUT_S
                )
                return {s.request_id: s.worker_index for s in answer.streams if s.request_id.startswith("on-worker")}

            found = eventually(listed, lambda found: len(found) == WORKERS, timeout_s=30.0)
            assert found == {f"on-worker-{w}": w for w in range(WORKERS)}
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()


def test_json_lines_of_a_refused_call_carry_the_clients_request_id(server: tuple[Launched, int]) -> None:
    launched_server, _ = server
    ids = []
    for worker in range(WORKERS):
        channel = raw_on(launched_server.address, worker)
        try:
            with pytest.raises(grpc.RpcError) as info:
                dataset_service_pb2_grpc.DatasetServiceStub(channel).OpenDatasource(
                    dataset_service_pb2.OpenDatasourceRequest(spec={"dataset": "nope"}),
                    timeout=TIMEOUT_S,
                    metadata=[("x-request-id", f"refused-on-{worker}")],
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            ids.append(f"refused-on-{worker}")
        finally:
            channel.close()
    assert launched_server.process.stderr is not None
    found: dict[str, dict[str, Any]] = {}
    while len(found) < len(ids):  # (the lines are on their way: the server writes one per refusal)
        line = launched_server.process.stderr.readline()
        assert line, f"the server's stderr ended before lines for {ids}"
        parsed = json.loads(line)
        if parsed.get("request_id") in ids:
            found[parsed["request_id"]] = parsed
    pids = set()
    for parsed in found.values():
        assert parsed["level"] == "WARNING" and "unknown dataset 'nope'" in parsed["message"]
        assert parsed["method"] == "/patchwire.v1.DatasetService/OpenDatasource" and parsed["identity"] == "anonymous"
        pids.add(parsed["pid"])
    assert len(pids) == WORKERS  # each worker wrote its own
