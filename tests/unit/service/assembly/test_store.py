"""The store without a server: creating a job again with the same parameters returns it, with others is refused;
a store reopened on the same state folder recovers its jobs and finishes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from patchwire.service import Limits
from patchwire.service._auth import Identity
from patchwire.service._datasource import DatasourceCache
from patchwire.service._errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted
from patchwire.service.assembly import AssemblyStore, EntrySpec, Job
from patchwire.service.assembly.results import result
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2

from _assembly_jobs import make_store, patches, resolver, slices, write_dataset

SHAPE = (4, 1, 2)  # two subjects of four slices each
ENTRIES = [EntrySpec("p", 1, np.dtype(np.float32))]
ALICE = Identity("alice", frozenset({"write"}))
BOB = Identity("bob", frozenset({"write"}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasourceCache]:
    with resolver(write_dataset(tmp_path_factory.mktemp("store"), [SHAPE, SHAPE])) as c:
        yield c


@pytest.fixture
def store(tmp_path: Path, cache: DatasourceCache) -> Iterator[AssemblyStore]:
    store = make_store(tmp_path / "state", cache)
    yield store
    store.close()


def _slice(i: int) -> np.ndarray:
    return np.full((1, 2, 1), i, np.float32)


def _post(job: Job, indices: list[int], last_batch: bool = False) -> None:
    job.post(indices, {"p": [_slice(i) for i in indices]}, last_batch)


def _wait_written(job: Job) -> None:
    for subject in job.subjects.values():
        assert subject.finished is None or subject.finished.wait(30)


def test_create_is_idempotent_for_the_same_parameters(store: AssemblyStore) -> None:
    job = store.create("a", slices(), ENTRIES, "average", ALICE)
    assert (job.owner, job.state, len(job.subjects)) == ("alice", apb.JOB_STATE_ACTIVE, 2)
    with_extractor = slices()
    with_extractor.extractor.SetInParent()  # what each sample is read as does not make another job
    assert store.create("a", with_extractor, list(ENTRIES), "average", ALICE) is job
    assert store.get("a") is job and list(store.jobs) == ["a"]


@pytest.mark.parametrize(
    ("spec", "entries", "mode"),
    [
        (patches((1, 1, 2)), ENTRIES, "average"),
        (slices(), [EntrySpec("p", 2, np.dtype(np.float32))], "average"),
        (slices(), [EntrySpec("p", 1, np.dtype(np.float64))], "average"),
        (slices(), ENTRIES, "gaussian"),
    ],
    ids=["spec", "channels", "dtype", "mode"],
)
def test_create_with_other_parameters_is_refused(
    store: AssemblyStore, spec: spec_pb2.DatasourceSpec, entries: list[EntrySpec], mode: str
) -> None:
    store.create("a", slices(), ENTRIES, "average", ALICE)
    with pytest.raises(FailedPrecondition, match="job_id: job 'a' already exists with other parameters"):
        store.create("a", spec, entries, mode, ALICE)


def test_another_identitys_job_id_is_taken_whatever_the_parameters(store: AssemblyStore) -> None:
    store.create("a", slices(), ENTRIES, "average", ALICE)
    for mode in ("average", "overwrite"):
        with pytest.raises(PermissionDenied, match="is taken: choose another id"):
            store.create("a", slices(), ENTRIES, mode, BOB)


def test_a_job_id_must_name_a_folder_of_its_own(store: AssemblyStore) -> None:
    with pytest.raises(InvalidArgument, match="does not name a folder of its own"):
        store.create("..", slices(), ENTRIES, "average", ALICE)
    assert not store.jobs


def test_jobs_beyond_the_limit_are_refused(tmp_path: Path, cache: DatasourceCache) -> None:
    store = AssemblyStore(tmp_path / "state", cache.get, 1 << 20, limits=Limits(max_jobs=1))
    try:
        store.create("a", slices(), ENTRIES, "average", ALICE)
        with pytest.raises(ResourceExhausted, match="the server already holds 1 assembly jobs"):
            store.create("b", slices(), ENTRIES, "average", BOB)
    finally:
        store.close()


def test_delete_removes_the_jobs_folder(store: AssemblyStore) -> None:
    job = store.create("a", slices(), ENTRIES, "average", ALICE)
    _post(job, [0, 1])
    assert job.directory.exists() and store.quota.used("a") > 0
    store.delete("a")
    assert not job.directory.exists() and store.quota.used("a") == 0 and not store.jobs


def test_a_reopened_store_recovers_its_jobs(tmp_path: Path, cache: DatasourceCache) -> None:
    state = tmp_path / "state"
    first = make_store(state, cache)
    job = first.create("a", slices(), ENTRIES, "average", ALICE)
    _post(job, [0, 1, 2, 3, 4])  # subject 0 complete, subject 1 one slice in
    _wait_written(job)
    used = first.quota.used("a")
    first.close()
    second = make_store(state, cache)
    try:
        second.load()
        recovered = second.get("a")
        assert recovered is not job and recovered.owner == "alice"
        assert [(s.state, s.count) for s in recovered.subjects.values()] == [
            (apb.SUBJECT_STATE_READY, 4),
            (apb.SUBJECT_STATE_IN_PROGRESS, 1),
        ]
        assert [(e.type, e.subject_index) for e in recovered.events] == [(apb.EVENT_TYPE_SUBJECT_READY, 0)]
        assert second.quota.used("a") == used  # what it holds on disk, charged again
        assert second.create("a", slices(), ENTRIES, "average", ALICE) is recovered
        _post(recovered, [4, 5, 6, 7])  # slice 4 again: a duplicate
        _wait_written(recovered)
        assert recovered.state == apb.JOB_STATE_COMPLETED
        for s in (0, 1):
            expected = np.arange(4 * s, 4 * s + 4, dtype=np.float32).reshape(4, 1, 1, 1)
            np.testing.assert_array_equal(result(recovered, s)["p"], np.broadcast_to(expected, (4, 1, 2, 1)))
    finally:
        second.close()
