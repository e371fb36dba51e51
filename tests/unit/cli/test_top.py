"""``patchwire top``: its rates from hand-made ListStreams answers, its text, its refusals, and one snapshot of a real
server serving a stream."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from patchwire.cli import build_parser
from patchwire.cli.top import ClientRow, format_view, host_of, run_top, view_of
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, server_service_pb2, spec_pb2
from patchwire.wire import framing

from _servers import child_env, threaded_server

RPC_TIMEOUT_S = 30


def stream(stream_id: str, peer: str, samples: int, nbytes: int, started: float, **fields: object) -> object:
    return server_service_pb2.StreamInfo(
        stream_id=stream_id,
        request_id=f"r-{stream_id}",
        identity=str(fields.pop("identity", "alice")),
        peer=peer,
        method="/patchwire.v1.DatasetService/StreamBatches",
        dataset="tiny",
        pattern="slice",
        started_unix=started,
        samples=samples,
        bytes=nbytes,
        **fields,
    )


def answer(time_unix: float, *streams: object) -> server_service_pb2.ListStreamsResponse:
    return server_service_pb2.ListStreamsResponse(streams=streams, time_unix=time_unix, replica_id="r0")


def test_rates_are_over_the_last_interval_or_a_new_streams_own_age() -> None:
    first = answer(
        110.0,
        stream("0.1", "ipv4:10.0.0.5:4000", 1000, 10_000_000, started=100.0, wait_seconds=3.0, work_seconds=1.0),
        stream("0.2", "ipv4:10.0.0.5:4001", 50, 500_000, started=105.0),
    )
    view, previous = view_of(first, "h:1", {})
    rates = {s.stream_id: (s.samples_per_s, s.bytes_per_s, s.age_s) for s in view.streams}
    assert rates == {"0.1": (100.0, 1e6, 10.0), "0.2": (10.0, 1e5, 5.0)}  # since each started
    assert [s.wait_share for s in view.streams] == [0.75, 0.0]
    second = answer(
        112.0,
        stream("0.1", "ipv4:10.0.0.5:4000", 1400, 14_000_000, started=100.0),
        stream("1.1", "ipv6:[::1]:7", 30, 300, started=111.0, identity="bob"),
        stream("0.9", "ipv4:10.0.0.5:4002", 0, 0, started=100.0),
    )
    second.streams[2].method = "/patchwire.v1.ServerService/ListStreams"  # another top: left out
    view, _ = view_of(second, "h:1", previous)
    rates = {s.stream_id: (s.samples_per_s, s.bytes_per_s) for s in view.streams}
    assert rates == {"0.1": (200.0, 2e6), "1.1": (30.0, 300.0)}  # 0.2 ended; 1.1 is a second old
    assert view.clients == (
        ClientRow("alice", "10.0.0.5", 1, 1400, 14_000_000, 200.0, 2e6),
        ClientRow("bob", "::1", 1, 30, 300, 30.0, 300.0),
    )
    assert (view.samples_per_s, view.bytes_per_s) == (230.0, 2e6 + 300.0)


def test_hosts_of_peers() -> None:
    assert host_of("ipv4:10.0.0.5:41234") == "10.0.0.5"
    assert host_of("ipv6:[fe80::1]:5") == "fe80::1"
    assert host_of("unix:/tmp/s.sock") == "unix"
    assert host_of("") == ""


def test_the_text_of_a_view() -> None:
    view, _ = view_of(answer(10.0, stream("0.1", "ipv4:10.0.0.5:4000", 20, 2_000_000, started=0.0)), "h:1", {})
    lines = format_view(view).splitlines()
    assert lines[0].startswith("h:1 (replica r0) at ") and lines[0].endswith(
        ": 1 streams, 1 clients, 2.0 samples/s, 0.2 MB/s"
    )
    assert lines[2].split() == ["IDENTITY", "HOST", "STREAMS", "SAMPLES/S", "MB/S", "SAMPLES", "MB"]
    assert lines[3].split() == ["alice", "10.0.0.5", "1", "2.0", "0.2", "20", "2.0"]
    assert lines[5].split()[:4] == ["STREAM", "REQUEST", "IDENTITY", "HOST"]
    assert lines[6].split() == ["0.1", "r-0.1", "alice", "10.0.0.5", "StreamBatches", "tiny", "slice", "10s", "2.0",
                                "0.2", "20", "2.0", "0%"]  # fmt: skip
    empty, _ = view_of(answer(10.0), "h:1", {})
    assert format_view(empty).splitlines()[1] == "no open streams"


@pytest.mark.parametrize("flag", ["--interval", "--timeout"])
def test_intervals_must_be_positive(flag: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_top(build_parser().parse_args(["top", "h:1", flag, "0"]), out, err) == 2
    assert err.getvalue() == "patchwire top: --interval and --timeout must be positive\n"


def test_no_server_is_an_error() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_top(build_parser().parse_args(["top", "127.0.0.1:1", "--once", "--timeout", "2"]), out, err) == 1
    assert err.getvalue().startswith("patchwire top: listing the streams of 127.0.0.1:1: ")
    assert out.getvalue() == ""


def test_one_snapshot_of_a_real_server(tiny_h5: Path) -> None:
    spec = spec_pb2.DatasourceSpec(
        dataset="tiny", extractor=spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"]))
    )
    spec.indexing_strategy.slice.slice_axis.append(0)
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=spec, batch_size=4, sample_weights=[1.0] * 60, samples_per_epoch=1 << 20
    )
    with (
        threaded_server({"tiny": tiny_h5}) as handle,
        grpc.insecure_channel(handle.server.address, options=framing.channel_options()) as channel,
    ):
        call = dataset_service_pb2_grpc.DatasetServiceStub(channel).StreamBatches(
            request, timeout=RPC_TIMEOUT_S, metadata=[("x-request-id", "top-1")]
        )
        try:
            next(call)
            out, err = io.StringIO(), io.StringIO()
            assert run_top(build_parser().parse_args(["top", handle.server.address, "--once"]), out, err) == 0
            # and the command itself, as a user runs it
            command = subprocess.run(
                [sys.executable, "-m", "patchwire.cli", "top", handle.server.address, "--once"],
                capture_output=True,
                text=True,
                timeout=60,
                env=child_env(),
            )
        finally:
            call.cancel()
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{handle.server.address} (replica {handle.server.config.replica_id}) at ")
    assert ": 1 streams, 1 clients, " in lines[0]
    assert lines[3].split()[:3] == ["anonymous", "127.0.0.1", "1"]
    row = lines[6].split()
    assert row[1:7] == ["top-1", "anonymous", "127.0.0.1", "StreamBatches", "tiny", "slice"]
    assert int(row[10].replace(",", "")) >= 4  # samples sent so far
    assert command.returncode == 0, command.stderr
    assert "top-1" in command.stdout and ": 1 streams, 1 clients, " in command.stdout
