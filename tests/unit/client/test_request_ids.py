"""Every call of a client carries a fresh request id, logged at DEBUG and carried by the error the server answered
with; a caller's own id is kept."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import grpc
import pytest

import patchwire.client as pw
from patchwire.client import Credentials
from patchwire.client._errors import from_grpc
from patchwire.client._request_ids import REQUEST_ID_KEY, request_id_of
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc
from patchwire.wire import framing

from _checks import FakeRpcError
from _servers import server_in_thread

LIST_DATASETS = "/patchwire.v1.DatasetService/ListDatasets: request id "
HEX16 = re.compile(r"[0-9a-f]{16}")
RPC_TIMEOUT_S = 30


def test_each_call_gets_a_fresh_id_the_server_echoes(tiny_h5: Path, caplog: pytest.LogCaptureFixture) -> None:
    with server_in_thread({"tiny": tiny_h5}) as server:
        channel = Credentials().channel(server.address, framing.channel_options())
        try:
            stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            with caplog.at_level(logging.DEBUG, logger="patchwire.client"):
                echoed = []
                for _ in range(2):
                    _, call = stub.ListDatasets.with_call(
                        dataset_service_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT_S
                    )
                    echoed.append(request_id_of(call))
            logged = [
                r.getMessage().rsplit(" ", 1)[1]
                for r in caplog.records
                if r.name == "patchwire.client" and r.getMessage().startswith(LIST_DATASETS)
            ]
            assert logged == echoed and len(set(echoed)) == 2
            assert all(HEX16.fullmatch(i or "") for i in echoed)
            # a caller's own id is kept
            _, call = stub.ListDatasets.with_call(
                dataset_service_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT_S, metadata=[(REQUEST_ID_KEY, "mine-1")]
            )
            assert request_id_of(call) == "mine-1"
        finally:
            channel.close()


def test_an_error_carries_the_request_id(tiny_h5: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (
        server_in_thread({"tiny": tiny_h5}) as server,
        pw.connect(server.address) as client,
        caplog.at_level(logging.DEBUG, logger="patchwire.client"),
        pytest.raises(pw.NotFoundError) as info,
    ):
        client.datasource("nope")
    error = info.value
    assert error.request_id is not None and HEX16.fullmatch(error.request_id)
    assert f"/patchwire.v1.DatasetService/OpenDatasource: request id {error.request_id}" in caplog.messages
    assert pickle.loads(pickle.dumps(error)).request_id == error.request_id


def test_an_error_without_an_echo_has_no_id() -> None:
    """(A server that does not echo ids, or an error raised before any answer.)"""
    error = from_grpc(FakeRpcError(grpc.StatusCode.NOT_FOUND), "reading")
    assert isinstance(error, pw.NotFoundError) and error.request_id is None
