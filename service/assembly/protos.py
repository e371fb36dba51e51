"""The assembly service's messages on the domain side: a CreateJobRequest checked and read into the store's
arguments, and jobs, subjects and events built into the messages that report them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from patchwire.service._errors import InvalidArgument, bounded
from patchwire.service.assembly.job import Job
from patchwire.service.assembly.persistence import Event
from patchwire.service.assembly.subjects import EntrySpec
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2
from patchwire.wire import tensors
from patchwire.wire.names import OVERLAP_MODES, overlap_mode_name
from patchwire.wire.replicas import new_job_id

__all__ = ["create_arguments", "event_message", "job_info", "subject_statuses"]

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Job ids name their folder under ``state_dir/jobs``: a letter or digit first (never ``.`` or ``..``), no ``/``."""
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
"""Entry names are part of buffer and result file names: no ``/``, no leading ``.``, at most 64 characters."""


def create_arguments(request: Any, replica_id: str) -> tuple[str, spec_pb2.DatasourceSpec, list[EntrySpec], str]:
    """The job id, spec, entries and overlap mode name a CreateJobRequest asks for, each checked (INVALID_ARGUMENT,
    in field order). Where the request names no job, the id is a new one whose home is this server, ``replica_id``
    (``<replica_id>.`` and 12 hex digits); an id the client chose is kept as given."""
    if not request.HasField("spec"):
        raise InvalidArgument("spec: the datasource whose predictions to assemble is required")
    if request.overlap_mode not in OVERLAP_MODES.values():
        raise InvalidArgument(
            f"overlap_mode: choose OVERLAP_MODE_OVERWRITE, _AVERAGE or _GAUSSIAN, got {request.overlap_mode}"
        )
    if not request.entries:
        raise InvalidArgument("entries: give at least one output entry (name, channels, dtype)")
    entries = []
    for k, e in enumerate(request.entries):
        if not _ENTRY_NAME.match(e.name):
            raise InvalidArgument(
                f"entries[{k}].name: {bounded(e.name)} may use only letters, digits, '-', '_' and '.', not begin "
                "with '.' or '-', and have 1 to 64 characters"
            )
        if e.channels <= 0:
            raise InvalidArgument(f"entries[{k}].channels: must be positive, got {e.channels}")
        try:
            dtype = tensors.dtype_from_proto(e.dtype)
        except ValueError:
            raise InvalidArgument(f"entries[{k}].dtype: unknown or unspecified dtype {e.dtype}") from None
        entries.append(EntrySpec(e.name, int(e.channels), dtype))
    if len({e.name for e in entries}) != len(entries):
        raise InvalidArgument("entries: entry names must be unique")
    job_id = request.job_id or new_job_id(replica_id)
    if not _JOB_ID.match(job_id):
        raise InvalidArgument(
            f"job_id: {bounded(job_id)} may use only letters, digits, '-', '_' and '.', must begin with a letter "
            "or digit and have at most 128 characters"
        )
    return job_id, request.spec, entries, overlap_mode_name(request.overlap_mode)


def job_info(job: Job) -> apb.JobInfo:
    return apb.JobInfo(
        job_id=job.id,
        dataset=job.source.dataset.name,
        state=job.state,
        entries=[
            apb.OutputEntry(name=e.name, channels=e.channels, dtype=tensors.dtype_to_proto(e.dtype))
            for e in job.entries
        ],
        overlap_mode=OVERLAP_MODES[job.mode],
        expected_samples=job.source.length,
        received_samples=sum(s.count for s in job.subjects.values()),
        subject_count=len(job.subjects),
        ready_subject_count=sum(s.state == apb.SUBJECT_STATE_READY for s in job.subjects.values()),
        last_event_sequence=len(job.events),
        resident_buffer_bytes=job.resident_bytes(),
        journalled=job.durable,
    )


def subject_statuses(job: Job, max_missing: int) -> list[apb.SubjectStatus]:
    """Every subject's progress, listing up to ``max_missing`` missing sample indices each."""
    return [
        apb.SubjectStatus(
            subject_index=s.index,
            subject=s.name,
            expected_samples=s.expected,
            received_samples=s.count,
            missing_samples=s.expected - s.count,
            state=s.state,
            forced=s.forced,
            missing_sample_indices=s.missing(max_missing) if max_missing > 0 else [],
        )
        for s in job.subjects.values()
    ]


def event_message(event: Event) -> apb.Event:
    return apb.Event(**dataclasses.asdict(event))  # (the event's fields are the message's)
