"""Confinement: no request names anything outside its own job folder.

The attacks: ``CreateJob(job_id="..")`` once wrote into the state folder's root and ``DeleteJob("..")`` removed the
whole state folder, other users' completed jobs included; entry names are part of buffer and result file names.
Each is refused with INVALID_ARGUMENT (or NOT_FOUND for a job that cannot exist), and the state folder and the jobs
in it are untouched afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from patchwire.service import PatchwireServer
from patchwire.service.assembly.journal import confined
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, spec_pb2, tensor_pb2

from _checks import expect_raw
from _servers import server_in_thread

BAD_JOB_IDS = ("..", ".", "../..", "../jobs", "a/../..", "/etc", ".hidden", "-rf", "a\x00b", "jobs/..", "")
BAD_ENTRY_NAMES = ("../../escape", "..", ".", "a/b", "/abs", ".hidden", "x" * 65, "a\x00b", "")


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("confined-state")


@pytest.fixture(scope="module")
def server(tiny_h5: Path, state_dir: Path) -> Iterator[PatchwireServer]:
    with server_in_thread({"tiny": tiny_h5}, state_dir=state_dir) as srv:
        yield srv


def _create(job_id: str, entry: str = "seg") -> apb.CreateJobRequest:
    return apb.CreateJobRequest(
        spec=spec_pb2.DatasourceSpec(
            dataset="tiny", indexing_strategy=spec_pb2.IndexingStrategy(slice=spec_pb2.SliceIndexing(slice_axis=[0]))
        ),
        entries=[apb.OutputEntry(name=entry, channels=1, dtype=tensor_pb2.DATA_TYPE_FLOAT32)],
        overlap_mode=apb.OVERLAP_MODE_OVERWRITE,
        job_id=job_id,
    )


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_job_ids_that_escape_are_refused_and_nothing_is_touched(
    stub: assembly_service_pb2_grpc.AssemblyServiceStub, state_dir: Path
) -> None:
    stub.CreateJob(_create("victim"))
    before = _tree(state_dir)
    assert "jobs/victim/job.json" in before
    for job_id in BAD_JOB_IDS:
        if job_id == "":
            continue  # an empty id asks the server to make one
        with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "job_id: "):
            stub.CreateJob(_create(job_id))
        with expect_raw(grpc.StatusCode.NOT_FOUND, "unknown assembly job"):
            stub.DeleteJob(apb.DeleteJobRequest(job_id=job_id))
        with expect_raw(grpc.StatusCode.NOT_FOUND, "unknown assembly job"):
            stub.AbortJob(apb.AbortJobRequest(job_id=job_id))
    assert _tree(state_dir) == before
    assert [j.job_id for j in stub.ListJobs(apb.ListJobsRequest()).jobs] == ["victim"]
    stub.DeleteJob(apb.DeleteJobRequest(job_id="victim"))
    assert (state_dir / "jobs").is_dir()


def test_entry_names_that_escape_are_refused(
    stub: assembly_service_pb2_grpc.AssemblyServiceStub, state_dir: Path
) -> None:
    before = _tree(state_dir)
    for name in BAD_ENTRY_NAMES:
        with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "entries[0].name: "):
            stub.CreateJob(_create("entries", entry=name))
    assert _tree(state_dir) == before


def test_unknown_job_names_no_other_jobs(stub: assembly_service_pb2_grpc.AssemblyServiceStub) -> None:
    stub.CreateJob(_create("someone-elses"))
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.GetJobStatus(apb.GetJobStatusRequest(job_id="nope"))
        assert "someone-elses" not in info.value.details()  # type: ignore[attr-defined]
    finally:
        stub.DeleteJob(apb.DeleteJobRequest(job_id="someone-elses"))


@pytest.mark.parametrize("name", ["job", "a.b", "x-1_2"])
def test_confined_accepts_plain_names(tmp_path: Path, name: str) -> None:
    assert confined(tmp_path, name) == tmp_path.resolve() / name


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../x", "/etc", "a/../.."])
def test_confined_refuses_what_leaves_the_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        confined(tmp_path, name)


def test_confined_refuses_a_symbolic_link_out(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError):
        confined(tmp_path / "root", "link")
