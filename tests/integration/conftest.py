"""Fixtures of the integration tests: a real server on 127.0.0.1 port 0 (a module may define its own ``server``,
which the fixtures below then connect to), one client per module, and the assembly service's raw stub for
requests the client never builds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import patchwire.client as pw
from patchwire.service import PatchwireServer
from patchwire.v1 import assembly_service_pb2_grpc
from patchwire.wire import framing

from _servers import server_in_thread


@pytest.fixture(scope="session")
def server(tiny_h5: Path, vary_h5: Path) -> Iterator[PatchwireServer]:
    """The session's server on the "tiny" and "vary" datasets."""
    with server_in_thread({"tiny": tiny_h5, "vary": vary_h5}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: PatchwireServer) -> Iterator[pw.Client]:
    """One client per module and server (closing a channel that waited for readiness takes gRPC about 0.2 s)."""
    with pw.connect(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: PatchwireServer) -> Iterator[assembly_service_pb2_grpc.AssemblyServiceStub]:
    """The generated AssemblyService stub, for requests the client never builds."""
    with grpc.insecure_channel(server.address, options=framing.channel_options()) as channel:
        yield assembly_service_pb2_grpc.AssemblyServiceStub(channel)
