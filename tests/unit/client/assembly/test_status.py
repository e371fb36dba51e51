"""Job status and events converted from their protobuf messages: every field, enum names lower-cased without their
prefix, missing indices as a tuple."""

from __future__ import annotations

from patchwire.client import AssemblyEvent, JobStatus, SubjectProgress
from patchwire.client.assembly.status import assembly_event, job_status
from patchwire.v1 import assembly_service_pb2 as apb


def test_job_status_with_subjects() -> None:
    info = apb.JobInfo(
        job_id="brains",
        dataset="tiny",
        state=apb.JOB_STATE_ACTIVE,
        overlap_mode=apb.OVERLAP_MODE_GAUSSIAN,
        expected_samples=60,
        received_samples=25,
        subject_count=3,
        ready_subject_count=1,
        last_event_sequence=4,
        resident_buffer_bytes=1 << 20,
        journalled=True,
    )
    subjects = [
        apb.SubjectStatus(
            subject_index=0,
            subject="Subject_1",
            expected_samples=20,
            received_samples=20,
            state=apb.SUBJECT_STATE_READY,
        ),
        apb.SubjectStatus(
            subject_index=1,
            subject="Subject_2",
            expected_samples=20,
            received_samples=5,
            missing_samples=15,
            state=apb.SUBJECT_STATE_IN_PROGRESS,
            forced=True,
            missing_sample_indices=[25, 26],
        ),
    ]
    assert job_status(info, subjects) == JobStatus(
        "brains",
        "tiny",
        "active",
        "gaussian",
        60,
        25,
        3,
        1,
        4,
        1 << 20,
        True,
        (
            SubjectProgress(0, "Subject_1", 20, 20, 0, "ready", False, ()),
            SubjectProgress(1, "Subject_2", 20, 5, 15, "in_progress", True, (25, 26)),
        ),
    )


def test_job_status_without_subjects_and_other_states() -> None:
    status = job_status(apb.JobInfo(job_id="j", state=apb.JOB_STATE_ABORTED, overlap_mode=apb.OVERLAP_MODE_OVERWRITE))
    assert (status.job_id, status.state, status.overlap, status.journalled, status.subjects) == (
        "j",
        "aborted",
        "overwrite",
        False,
        (),
    )
    assert job_status(apb.JobInfo(state=apb.JOB_STATE_COMPLETED)).state == "completed"
    pending = apb.SubjectStatus(state=apb.SUBJECT_STATE_PENDING)
    assert job_status(apb.JobInfo(), [pending]).subjects[0].state == "pending"


def test_assembly_event() -> None:
    event = apb.Event(
        sequence=7, type=apb.EVENT_TYPE_SUBJECT_READY, subject_index=2, subject="Subject_3", time_unix_ms=1234
    )
    assert assembly_event(event) == AssemblyEvent(7, "subject_ready", 2, "Subject_3", 1234)
    assert assembly_event(apb.Event(type=apb.EVENT_TYPE_JOB_COMPLETED)).type == "job_completed"
    assert assembly_event(apb.Event(type=apb.EVENT_TYPE_JOB_ABORTED)).type == "job_aborted"
