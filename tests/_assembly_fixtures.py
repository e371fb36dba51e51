"""Fixtures and checks shared by the assembly test modules. A module that imports the fixtures defines ``server``
(a running PatchwireServer): ``client`` and ``stub`` connect to it once per module."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest

import patchwire.client as pw
from patchwire.service import PatchwireServer
from patchwire.v1 import assembly_service_pb2_grpc
from patchwire.wire import framing

T = TypeVar("T")


@pytest.fixture(scope="module")
def client(server: PatchwireServer) -> Iterator[pw.Client]:
    """One client for the module (closing a channel that waited for readiness takes gRPC about 0.2 s)."""
    with pw.connect(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: PatchwireServer) -> Iterator[assembly_service_pb2_grpc.AssemblyServiceStub]:
    """The generated stub, for requests the client never builds."""
    with grpc.insecure_channel(server.address, options=framing.channel_options()) as channel:
        yield assembly_service_pb2_grpc.AssemblyServiceStub(channel)


@contextlib.contextmanager
def expect_raw(code: grpc.StatusCode, *fragments: str) -> Iterator[None]:
    """The block (a raw stub call) fails with ``code`` and details holding every fragment."""
    with pytest.raises(grpc.RpcError) as info:
        yield
    exc: Any = info.value
    assert exc.code() == code, exc
    for fragment in fragments:
        assert fragment in exc.details(), f"{fragment!r} not in {exc.details()!r}"


def eventually(read: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 10.0) -> T:
    """``read()`` until ``ok`` holds for it (state that the server settles on its own threads), or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r} after {timeout_s} s"
        time.sleep(0.01)
