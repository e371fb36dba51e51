"""Posting to a job without a server: subjects become ready when complete, duplicates count once, overlapping
patches blend as hand-computed, and a last batch forces what is in progress."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from patchwire.service._datasource import DatasourceCache
from patchwire.service._errors import FailedPrecondition, InvalidArgument, OutOfRange
from patchwire.service.assembly import EntrySpec, Job
from patchwire.service.assembly.results import result
from patchwire.v1 import assembly_service_pb2 as apb

from _assembly_jobs import make_job, patches, resolver, write_dataset

ENTRY = EntrySpec("p", 1, np.dtype(np.float32))
# two subjects of 1x1x4 voxels; patches of 1x1x3 at stride 1: x 0..2 (sample 2k) and x 1..3 (sample 2k + 1)
SPEC = patches((1, 1, 3), (1, 1, 1))
A = np.array([1.0, 2.0, 3.0], np.float32)  # subject 0's first patch
B = np.array([10.0, 20.0, 30.0], np.float32)  # its second, overlapping the first at x 1 and 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasourceCache]:
    with resolver(write_dataset(tmp_path_factory.mktemp("job"), [(1, 1, 4), (1, 1, 4)])) as c:
        yield c


def _patch(values: np.ndarray) -> np.ndarray:
    return values.reshape(1, 1, 3, 1)


def _post(job: Job, indices: list[int], values: list[np.ndarray], last_batch: bool = False) -> object:
    return job.post(indices, {"p": [_patch(v) for v in values]}, last_batch)


def _volume(job: Job, subject: int = 0) -> np.ndarray:
    return np.asarray(result(job, subject)["p"])[0, 0, :, 0]


def test_a_subject_is_ready_once_every_sample_arrived(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY])
    first = _post(job, [1], [B])
    assert (first.accepted, first.duplicates, first.ready_subjects) == (1, 0, [])
    assert job.subjects[0].state == apb.SUBJECT_STATE_IN_PROGRESS
    assert job.subjects[0].journal.path.exists()  # journalled before it was acknowledged
    with pytest.raises(FailedPrecondition, match="is not ready: 1 of 2 samples received"):
        result(job, 0)
    second = _post(job, [0, 2], [A, A])
    assert (second.accepted, second.duplicates, second.ready_subjects) == (2, 0, [0])
    assert job.subjects[0].state == apb.SUBJECT_STATE_READY and not job.subjects[0].forced
    assert not job.subjects[0].journal.path.exists()  # its volume is in results/: the journal went
    assert job.state == apb.JOB_STATE_ACTIVE
    _post(job, [3], [B])
    assert job.state == apb.JOB_STATE_COMPLETED
    assert [(e.type, e.subject_index) for e in job.events] == [
        (apb.EVENT_TYPE_SUBJECT_READY, 0),
        (apb.EVENT_TYPE_SUBJECT_READY, 1),
        (apb.EVENT_TYPE_JOB_COMPLETED, -1),
    ]


def test_duplicates_count_once(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY])
    twice = _post(job, [0, 0], [A, A + 100])
    assert (twice.accepted, twice.duplicates) == (1, 1)
    again = _post(job, [0, 1], [A + 100, B])
    assert (again.accepted, again.duplicates, again.ready_subjects) == (1, 1, [0])
    assert job.subjects[0].count == 2
    np.testing.assert_array_equal(_volume(job), [1.0, 6.0, 11.5, 30.0])  # the first prediction of sample 0 counts
    retried = _post(job, [0], [A])  # a ready subject's sample again: acknowledged as a duplicate
    assert (retried.accepted, retried.duplicates) == (0, 1)


def test_average_blending(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY], mode="average")
    _post(job, [0, 1], [A, B])
    np.testing.assert_array_equal(_volume(job), [1.0, (2.0 + 10.0) / 2, (3.0 + 20.0) / 2, 30.0])


def test_gaussian_blending(cache: DatasourceCache, tmp_path: Path) -> None:
    """A 3-voxel patch weighs 1 at its centre and exp(-1 / (2 sigma^2)) at its ends, sigma = 3 / 8."""
    job = make_job(cache, SPEC, tmp_path, [ENTRY], mode="gaussian")
    _post(job, [1, 0], [B, A])
    end = math.exp(-1 / (2 * (3 / 8) ** 2))
    expected = [1.0, (2.0 + 10.0 * end) / (1 + end), (3.0 * end + 20.0) / (end + 1), 30.0]
    np.testing.assert_allclose(_volume(job), expected, rtol=1e-6)


def test_overwrite_keeps_the_last_prediction(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY], mode="overwrite")
    _post(job, [1, 0], [B, A])
    np.testing.assert_array_equal(_volume(job), [1.0, 2.0, 3.0, 30.0])


def test_integer_entries_are_rounded_means(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [EntrySpec("p", 1, np.dtype(np.uint8))])
    job.post([0, 1], {"p": [_patch(np.array([1, 2, 3], np.uint8)), _patch(np.array([3, 6, 255], np.uint8))]}, False)
    volume = np.asarray(result(job, 0)["p"])
    assert volume.dtype == np.uint8
    np.testing.assert_array_equal(volume[0, 0, :, 0], [1, 2, 4, 255])  # 2.5 and 4.5: halves round to even


def test_a_last_batch_forces_subjects_in_progress(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY])
    posted = _post(job, [0], [A], last_batch=True)
    assert posted.ready_subjects == [0]
    subject = job.subjects[0]
    assert (subject.state, subject.forced, subject.missing(10)) == (apb.SUBJECT_STATE_READY, True, [1])
    np.testing.assert_array_equal(_volume(job), [1.0, 2.0, 3.0, 0.0])  # never predicted: no weight, a zero mean
    assert subject.forced_path().exists()  # recovery keeps what had arrived
    assert job.subjects[1].state == apb.SUBJECT_STATE_PENDING  # nothing arrived: nothing to force
    assert job.state == apb.JOB_STATE_ACTIVE
    with pytest.raises(FailedPrecondition, match="was already finished before sample 1 arrived"):
        _post(job, [1], [B])


def test_a_refused_batch_changes_nothing(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY])
    with pytest.raises(OutOfRange, match="sample index 4 is out of range for job 'job' with 4 samples"):
        _post(job, [0, 4], [A, A])
    with pytest.raises(InvalidArgument, match=r"has shape \(1, 1, 2, 1\), expected \(1, 1, 3, 1\)"):
        job.post([0], {"p": [np.zeros((1, 1, 2, 1), np.float32)]}, False)
    with pytest.raises(InvalidArgument, match="expected exactly the entries"):
        job.post([0], {"q": [_patch(A)]}, False)
    assert job.subjects[0].count == 0 and not job.subjects[0].journal.path.exists()


def test_an_aborted_job_accepts_nothing_and_drops_its_journals(cache: DatasourceCache, tmp_path: Path) -> None:
    job = make_job(cache, SPEC, tmp_path, [ENTRY])
    _post(job, [0], [A])
    job.abort()
    assert job.state == apb.JOB_STATE_ABORTED and job.subjects[0].state == apb.SUBJECT_STATE_ABORTED
    assert not job.subjects[0].journal.path.exists()
    with pytest.raises(FailedPrecondition, match="was aborted: it accepts no predictions"):
        _post(job, [1], [B])
    with pytest.raises(FailedPrecondition, match="is not active"):
        job.abort()
