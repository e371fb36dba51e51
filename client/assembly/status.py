"""What an assembly job reports: job and subject progress and subject-ready events, converted from their protobuf
messages into frozen dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire.names import overlap_mode_name

__all__ = ["AssemblyEvent", "JobStatus", "SubjectProgress", "assembly_event", "job_status"]


@dataclass(frozen=True)
class SubjectProgress:
    subject_index: int
    subject: str
    expected: int
    received: int
    missing: int
    state: str
    """'pending', 'in_progress', 'ready' or 'aborted'."""
    forced: bool
    missing_sample_indices: tuple[int, ...]


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    dataset: str
    state: str
    """'active', 'completed' or 'aborted'."""
    overlap: str
    expected: int
    received: int
    subject_count: int
    ready_subject_count: int
    last_event_sequence: int
    resident_buffer_bytes: int
    journalled: bool
    """True: acknowledged predictions are on disk and the job survives a server restart (a server with a state
    folder); False: the job lives in the server's memory."""
    subjects: tuple[SubjectProgress, ...] = ()
    home: str = ""
    """The replica id of the job's home, where a client of several replicas read it ('' from one server)."""


@dataclass(frozen=True)
class AssemblyEvent:
    sequence: int
    type: str
    """'subject_ready', 'job_completed' or 'job_aborted'."""
    subject_index: int
    subject: str
    time_unix_ms: int


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def job_status(info: apb.JobInfo, subjects: Sequence[apb.SubjectStatus] = ()) -> JobStatus:
    return JobStatus(
        info.job_id,
        info.dataset,
        _enum_name(apb.JobState, info.state, "JOB_STATE_"),
        overlap_mode_name(info.overlap_mode),
        info.expected_samples,
        info.received_samples,
        info.subject_count,
        info.ready_subject_count,
        info.last_event_sequence,
        info.resident_buffer_bytes,
        info.journalled,
        tuple(
            SubjectProgress(
                s.subject_index,
                s.subject,
                s.expected_samples,
                s.received_samples,
                s.missing_samples,
                _enum_name(apb.SubjectState, s.state, "SUBJECT_STATE_"),
                s.forced,
                tuple(s.missing_sample_indices),
            )
            for s in subjects
        ),
    )


def assembly_event(event: apb.Event) -> AssemblyEvent:
    return AssemblyEvent(
        event.sequence,
        _enum_name(apb.EventType, event.type, "EVENT_TYPE_"),
        event.subject_index,
        event.subject,
        event.time_unix_ms,
    )
