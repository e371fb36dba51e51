"""A real ``patchwire serve --config FILE`` process serves what its file, the environment and its flags say: the
file's dataset (a path relative to the file's folder) and state folder, the file's limit in a RESOURCE_EXHAUSTED
message, the environment's replica id and limit over the file's, the flag's port over the file's."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from patchwire.cli.launch import launched, serve_command
from patchwire.v1 import (
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    server_service_pb2,
    server_service_pb2_grpc,
)
from patchwire.wire import framing

from _checks import expect_raw
from _servers import child_env, slices_spec

RPC_TIMEOUT_S = 30


def _samples(stub: dataset_service_pb2_grpc.DatasetServiceStub, indices: list[int], subjects: int = 0) -> list[int]:
    spec = slices_spec()
    if subjects:
        spec.subject_subset.values.extend(f"s{i}" for i in range(subjects))
    request = dataset_service_pb2.GetSamplesRequest(spec=spec, sample_indices=indices)
    messages = stub.GetSamples(request, timeout=RPC_TIMEOUT_S)
    return [int(i) for m in messages if m.HasField("batch") for i in m.batch.sample_indices]


@pytest.mark.timeout(120)
def test_a_server_runs_on_its_configuration_file(tiny_h5: Path, tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "tiny.h5").symlink_to(tiny_h5)
    config = folder / "patchwire.toml"
    config.write_text(
        'port = 1\nstate_dir = "state"\nreplica_id = "from-file"\n'
        '[datasets]\ntiny = "data/tiny.h5"\n'
        "[limits]\nmax_indices = 3\nmax_subjects = 100\n"
    )
    env = {**child_env(), "PATCHWIRE_REPLICA_ID": "from-env", "PATCHWIRE_LIMITS__MAX_SUBJECTS": "2"}
    # serve_command's --port 0 (a flag) wins over the file's port 1
    with (
        launched(serve_command({}, "--config", str(config)), env=env) as server,
        grpc.insecure_channel(server.address, options=framing.channel_options()) as channel,
    ):
        dstub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        listed = dstub.ListDatasets(dataset_service_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT_S)
        assert [d.name for d in listed.datasets] == ["tiny"]
        assert _samples(dstub, [0, 1, 2]) == [0, 1, 2]
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "4 indices", "limit of 3", "--max-indices"):
            _samples(dstub, [0, 1, 2, 3])
        with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 2", "--max-subjects"):
            _samples(dstub, [0], subjects=3)
        info = server_service_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
            server_service_pb2.GetServerInfoRequest(), timeout=RPC_TIMEOUT_S
        )
        assert info.replica_id == "from-env"
        assert (folder / "state").is_dir()
