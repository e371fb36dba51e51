"""The catalog and the server's lifecycle: datasets and their description, health, reflection, graceful stop, the
``patchwire serve`` command (signals and argument errors), and datasources that travel to other processes."""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.service import FailedPrecondition, PatchwireServer, ServerConfig

from _servers import child_env, serve_args, serve_process, threaded_server

SERVICE = "patchwire.v1.DatasetService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RPC_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 15


# -- catalog --------------------------------------------------------------------------------------------------------


def test_datasets_lists_every_served_dataset(client: pw.Client) -> None:
    assert client.datasets() == ["tiny", "vary"]


def _expected_description(path: Path) -> dict[str, object]:
    """What DescribeDataset should say, read straight from the file with h5py."""
    with h5py.File(path, "r") as f:
        subjects = [s.decode() for s in f["meta/subjects"][()]]
        categories = list(f["data"].keys())
        names = {c: tuple(s.decode() for s in f[f"meta/names/{c}_names"][()]) for c in categories}
        arrays = []
        for i in range(len(subjects)):
            key = defs.subject_index_to_str(i, len(subjects))
            arrays.append({c: (f[f"data/{c}/{key}"].shape, str(f[f"data/{c}/{key}"].dtype)) for c in categories})
        props = [
            (
                tuple(int(v) for v in f["meta/image_props/shapes"][i]),
                tuple(float(v) for v in f["meta/image_props/origins"][i]),
                tuple(float(v) for v in f["meta/image_props/spacing"][i]),
                tuple(float(v) for v in f["meta/image_props/directions"][i]),
            )
            for i in range(len(subjects))
        ]
    return {"subjects": subjects, "categories": categories, "names": names, "arrays": arrays, "props": props}


def _check_against_file(info: pw.DatasetInfo, path: Path) -> None:
    expected = _expected_description(path)
    assert [s.name for s in info.subjects] == expected["subjects"]
    assert [s.index for s in info.subjects] == list(range(len(info.subjects)))
    assert list(info.categories) == expected["categories"]
    assert info.entry_names == expected["names"]
    for subject, arrays, props in zip(info.subjects, expected["arrays"], expected["props"], strict=True):  # type: ignore[call-overload]
        assert {a.category: (a.shape, a.dtype) for a in subject.arrays} == arrays
        p = subject.image_properties
        assert p is not None
        assert (p.size, p.origin, p.spacing, p.direction) == props
        assert p.dimensions == 3


def test_describe_matches_the_file(client: pw.Client, tiny_h5: Path) -> None:
    info = client.describe("tiny")
    _check_against_file(info, tiny_h5)
    # ... and what tests/_datasets.py wrote, spelled out
    assert info.name == "tiny"
    assert [s.name for s in info.subjects] == ["Subject_1", "Subject_2", "Subject_3"]
    assert info.categories == ("images", "labels", "mask")
    assert info.entry_names == {"images": ("T1", "T2"), "labels": ("GT",), "mask": ("MASK",)}
    for i, subject in enumerate(info.subjects):
        assert subject.index == i
        assert [(a.category, a.shape, a.dtype) for a in subject.arrays] == [
            ("images", (20, 24, 16, 2), "float32"),
            ("labels", (20, 24, 16, 1), "uint8"),
            ("mask", (20, 24, 16, 1), "uint8"),
        ]
        p = subject.image_properties
        assert p is not None
        assert p.size == (16, 24, 20)  # ITK order (x, y, z)
        assert p.spacing == pytest.approx((0.9 + 0.1 * i, 1.1, 2.5))
        assert p.origin == (-10.0 * i, 12.5, -3.25)
        assert p.direction == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def test_describe_gives_each_subject_its_own_shape(client: pw.Client, vary_h5: Path) -> None:
    info = client.describe("vary")
    _check_against_file(info, vary_h5)
    for i, subject in enumerate(info.subjects):
        shapes = {a.category: a.shape for a in subject.arrays}
        assert shapes == {
            "images": (20 + 2 * i, 24, 16, 2),
            "labels": (20 + 2 * i, 24, 16, 1),
            "mask": (20 + 2 * i, 24, 16, 1),
        }
        assert subject.image_properties is not None
        assert subject.image_properties.size == (16, 24, 20 + 2 * i)


def test_get_subjects_is_file_order(client: pw.Client) -> None:
    ds = client.datasource("vary", extr.EmptyIndexing(), extr.SubjectExtractor(), subject_subset=["Subject_3"])
    try:
        assert ds.get_subjects() == ["Subject_1", "Subject_2", "Subject_3"]  # the subset does not apply, as in pymia
        assert len(ds) == 1
        assert ds[0]["subject_index"] == 2  # global subject indices in file order
    finally:
        ds.close()


# -- standard services ----------------------------------------------------------------------------------------------


@pytest.fixture
def channel(server: PatchwireServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_reports_serving(channel: grpc.Channel, service: str) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S
    )
    assert response.status == SERVING


def test_health_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT_S
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _reflect(
    channel: grpc.Channel,
    request: reflection_pb2.ServerReflectionRequest,
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S))
    return response


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    response = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_reflection_describes_the_dataset_service(channel: grpc.Channel) -> None:
    response = _reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in response.file_descriptor_response.file_descriptor_proto
    ]
    by_name = {f.name: f for f in files}
    assert "patchwire/v1/dataset_service.proto" in by_name
    (service,) = by_name["patchwire/v1/dataset_service.proto"].service
    assert service.name == "DatasetService"
    assert [m.name for m in service.method] == [
        "ListDatasets",
        "DescribeDataset",
        "OpenDatasource",
        "GetSamples",
        "DirectExtract",
        "StreamBatches",
        "SelectIndices",
    ]


# -- lifecycle --------------------------------------------------------------------------------------------------------


def test_graceful_stop_flips_health_to_not_serving_first(tiny_h5: Path) -> None:
    with threaded_server({"tiny": tiny_h5}) as handle, grpc.insecure_channel(handle.server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = {
            name: health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S)
            for name in ("", SERVICE)
        }
        for watch in watches.values():
            assert next(watch).status == SERVING
        # reads retry while the server is unreachable (RetryPolicy): a short budget shows them give up
        client = pw.connect(handle.server.address, timeout=RPC_TIMEOUT_S)
        ds = client.datasource(
            "tiny", extr.EmptyIndexing(), extr.SubjectExtractor(), retry=pw.RetryPolicy(budget_s=0.5)
        )
        # The open Watch calls keep the server in its grace period until they are cancelled below, so health is
        # observed while the server is stopping, with no timing involved.
        stopping = handle.submit(handle.server.stop(grace=RPC_TIMEOUT_S))
        for watch in watches.values():
            assert next(watch).status == NOT_SERVING
            watch.cancel()
        stopping.result(timeout=RPC_TIMEOUT_S)
        handle.submit(handle.server.stop()).result(timeout=RPC_TIMEOUT_S)  # idempotent
        with pytest.raises(pw.ConnectionFailed) as info:
            client.datasets()
        assert not isinstance(info.value, grpc.RpcError)
        with pytest.raises(pw.ConnectionFailed):
            ds[0]
        ds.close()
        client.close()


def test_no_dataset_that_can_be_served_stops_the_start_and_leaks_nothing(tiny_h5: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file")
    inconsistent = tmp_path / "inconsistent.h5"
    with h5py.File(tiny_h5, "r") as src, h5py.File(inconsistent, "w") as dst:
        src.copy("meta", dst)
        src.copy("data", dst)
        del dst["data/images/1"]  # opens, but fails validation after other arrays were looked at
    open_files = h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)
    server = PatchwireServer(ServerConfig(datasets={"bad": bad, "inconsistent": inconsistent}, port=0))
    with pytest.raises(FailedPrecondition, match=r"dataset 'bad': cannot open.*no dataset can be served"):
        asyncio.run(server.start())
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == open_files
    asyncio.run(server.stop())  # nothing to stop: a no-op


# -- the patchwire serve command ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_command_serves_and_exits_cleanly_on_signal(tiny_h5: Path, sig: signal.Signals) -> None:
    with serve_process({"tiny": tiny_h5}) as (proc, address):
        assert re.fullmatch(r"127\.0\.0\.1:[1-9]\d*", address), address
        with pw.connect(address, timeout=RPC_TIMEOUT_S) as client:
            assert client.datasets() == ["tiny"]
            with grpc.insecure_channel(address) as channel:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S)
                    .status
                )
            assert status == SERVING
            ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor())
            assert ds[5]["images"].shape == (24, 16, 2)
            ds.close()
            proc.send_signal(sig)  # with the client still connected
            assert proc.wait(timeout=EXIT_TIMEOUT_S) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()


def _serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_args({}, *args), capture_output=True, text=True, env=child_env(), timeout=60, check=False
    )


def _assert_refused(done: subprocess.CompletedProcess[str], returncode: int, message: str) -> None:
    """``patchwire serve`` ended with ``returncode`` and said ``message``, without a traceback."""
    assert done.returncode == returncode
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_serve_command_rejects_a_dataset_without_name(tiny_h5: Path) -> None:
    done = _serve_fails("--dataset", str(tiny_h5))
    _assert_refused(done, 2, "expected NAME=PATH.h5")


@pytest.mark.slow
def test_serve_command_rejects_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"
    done = _serve_fails("--dataset", f"brains={missing}")
    _assert_refused(done, 2, f"dataset 'brains': no such file '{missing}'")


@pytest.mark.slow
def test_serve_command_rejects_duplicate_names(tiny_h5: Path, vary_h5: Path) -> None:
    done = _serve_fails("--dataset", f"brains={tiny_h5}", "--dataset", f"brains={vary_h5}")
    _assert_refused(done, 2, "dataset name given twice: brains")


@pytest.mark.slow
def test_serve_command_reports_a_file_that_is_not_a_dataset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file")
    done = _serve_fails("--dataset", f"brains={bad}")
    _assert_refused(done, 1, f"patchwire serve: dataset 'brains': cannot open {bad}")


@pytest.mark.slow
def test_serve_command_reports_a_port_in_use(tiny_h5: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve_fails("--dataset", f"tiny={tiny_h5}", "--port", str(port))
    _assert_refused(done, 1, f"patchwire serve: Failed to bind to address 127.0.0.1:{port}")


# -- datasources in other processes ------------------------------------------------------------------------------------


@pytest.fixture
def transformed(client: pw.Client) -> Iterator[pw.RemoteDatasource]:
    ds = client.datasource(
        "tiny",
        extr.SliceIndexing(),
        extr.DataExtractor(categories=("images", "labels")),
        tfm.Permute((2, 0, 1)),
        subject_subset=["Subject_2", "Subject_3"],
    )
    yield ds
    ds.close()


def test_datasource_pickles(transformed: pw.RemoteDatasource) -> None:
    clone = pickle.loads(pickle.dumps(transformed))
    try:
        assert len(clone) == len(transformed) == 40
        assert clone.subjects == transformed.subjects
        for i in (0, 25, -1):
            a, b = transformed[i], clone[i]
            assert a.keys() == b.keys()
            np.testing.assert_array_equal(a["images"], b["images"])
            np.testing.assert_array_equal(a["labels"], b["labels"])
        assert b["images"].shape == (2, 24, 16)
    finally:
        clone.close()


def test_unpickling_does_not_reopen(tiny_h5: Path) -> None:
    """A datasource unpickles without calling the server: it talks to the server on first use only."""
    short = pw.RetryPolicy(budget_s=0.5)  # the unpickled copy's reads give up soon once the server is gone
    with threaded_server({"tiny": tiny_h5}) as handle, pw.connect(handle.server.address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(), retry=short)
        payload = pickle.dumps(ds)
        assert ds[3]["images"].shape == (24, 16, 2)
        ds.close()
        handle.submit(handle.server.stop(0)).result(timeout=RPC_TIMEOUT_S)
        clone = pickle.loads(payload)
        assert len(clone) == 60
        with pytest.raises(pw.ConnectionFailed):
            clone[3]
        clone.close()


TORCH_FREE_CHILD = """
import json, pickle, sys
for name in ("torch", "tensorflow"):
    sys.modules[name] = None  # any import of them now fails
ds = pickle.loads(sys.stdin.buffer.read())
sample = ds[7]
print(json.dumps({"len": len(ds), "shape": list(sample["images"].shape), "sum": float(sample["images"].sum()),
                  "index": sample["sample_index"]}))
ds.close()
"""


@pytest.mark.slow
def test_datasource_works_unpickled_in_a_torch_free_process(transformed: pw.RemoteDatasource) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CHILD],
        input=pickle.dumps(transformed),
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    expected = transformed[7]["images"]
    assert result == {"len": 40, "shape": [2, 24, 16], "sum": float(expected.sum()), "index": 7}
