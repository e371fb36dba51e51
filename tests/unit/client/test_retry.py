"""Which failures the client retries (client/_retry.py), checked on errors a real gRPC channel gives."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest

from patchwire.client._retry import retriable
from patchwire.v1 import server_service_pb2 as spb
from patchwire.v1 import server_service_pb2_grpc


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_call_cancelled_because_this_process_closed_its_channel_is_not_retried() -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{_unused_port()}")
    stub = server_service_pb2_grpc.ServerServiceStub(channel)
    failure: list[grpc.RpcError] = []
    waiting = threading.Event()

    def call() -> None:
        future = stub.GetServerInfo.future(spb.GetServerInfoRequest(), timeout=30, wait_for_ready=True)
        waiting.set()
        try:
            future.result()
        except grpc.RpcError as exc:
            failure.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    waiting.wait(10)
    channel.close()  # the call still waits for a server: gRPC cancels it
    caller.join(10)
    (exc,) = failure
    assert exc.code() == grpc.StatusCode.CANCELLED
    assert not retriable(exc, read=True)


@pytest.mark.parametrize("read", [False, True])
def test_a_server_that_is_not_there_is_retried(read: bool) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{_unused_port()}") as channel, pytest.raises(grpc.RpcError) as info:
        server_service_pb2_grpc.ServerServiceStub(channel).GetServerInfo(spb.GetServerInfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert retriable(info.value, read=read)
