"""What a job keeps in its folder besides journals and volumes, and how a restart rebuilds a job from that folder.

``job.json`` (written atomically whenever the job's state changes) holds the job's parameters; ``events.jsonl`` is
the job's event log, each event appended and fsync'ed before it counts. Recovery reads both back, keeps the results
of ready subjects, rebuilds partial volumes by replaying their journals, finishes subjects whose last sample was
journalled but whose volume was never written, and charges what the job holds on disk to the quota again.

A job that is not ``durable`` writes neither file: nothing of it outlives the process.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchwire.service.assembly.journal import write_atomic
from patchwire.service.assembly.subjects import EntrySpec
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2

if TYPE_CHECKING:
    from patchwire.service.assembly.job import Job

__all__ = ["Event", "EventLog", "JobMetadata", "read_metadata", "recover", "write_metadata"]

_log = logging.getLogger(__name__)


@dataclass
class Event:
    sequence: int
    type: apb.EventType.ValueType
    subject_index: int = -1
    subject: str = ""
    time_unix_ms: int = 0


class EventLog:
    """A job's events in order (sequence numbers from 1); with ``durable`` each is appended to ``path`` and fsync'ed
    before it counts. The owning job serialises access (under its lock)."""

    def __init__(self, path: Path, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self.events: list[Event] = []

    def append(self, type_: apb.EventType.ValueType, subject_index: int = -1, subject: str = "") -> Event:
        event = Event(len(self.events) + 1, type_, subject_index, subject, int(time.time() * 1000))
        if self.durable:
            with open(self.path, "a") as f:
                f.write(json.dumps(event.__dict__) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.events.append(event)
        return event

    def announced_ready(self, subject_index: int) -> bool:
        """Whether the log holds the subject's ready event."""
        return any(e.type == apb.EVENT_TYPE_SUBJECT_READY and e.subject_index == subject_index for e in self.events)

    def load(self, job_id: str) -> None:
        """Reads the events back from ``path``, cutting off a torn last line."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        for line in lines:
            try:
                self.events.append(Event(**json.loads(line)))
            except (ValueError, TypeError):
                break
        if len(self.events) < len(lines) or (text and not text.endswith("\n")):
            # cut the torn tail off: events appended after it would otherwise be glued to it and lost
            _log.warning("job %s: dropping a torn event line", job_id)
            write_atomic(self.path, "".join(json.dumps(e.__dict__) + "\n" for e in self.events).encode())


@dataclass(frozen=True)
class JobMetadata:
    """A job's parameters as ``job.json`` holds them."""

    job_id: str
    spec: spec_pb2.DatasourceSpec
    entries: list[EntrySpec]
    mode: str
    state: apb.JobState.ValueType
    created_ms: int
    owner: str | None
    """None: a job written before jobs had owners (administrators only)."""


def read_metadata(path: Path) -> JobMetadata:
    meta = json.loads(path.read_text())
    return JobMetadata(
        meta["job_id"],
        spec_pb2.DatasourceSpec.FromString(base64.b64decode(meta["spec"])),
        [EntrySpec(n, int(c), np.dtype(d)) for n, c, d in meta["entries"]],
        meta["mode"],
        apb.JobState.ValueType(int(meta["state"])),
        int(meta["created_ms"]),
        meta.get("owner"),
    )


def write_metadata(job: Job) -> None:
    """Writes ``job.json`` atomically (nothing for a job that is not durable)."""
    if not job.durable:
        return
    meta: dict[str, Any] = {
        "job_id": job.id,
        "spec": base64.b64encode(job.spec.SerializeToString(deterministic=True)).decode(),
        "entries": [[e.name, e.channels, e.dtype.str] for e in job.entries],
        "mode": job.mode,
        "state": int(job.state),
        "created_ms": job.created_ms,
        "owner": job.owner,
    }
    write_atomic(job.directory / "job.json", json.dumps(meta, indent=1).encode())


def recover(job: Job) -> None:
    """Rebuilds a job's state from its folder: events, finished subjects, and partial volumes replayed from
    journals; then charges what it holds on disk. Runs before the job is served (no lock is taken)."""
    job.log.load(job.id)
    for subject in job.subjects.values():
        for key in subject.buffer_specs():
            subject.buffer_path(key).unlink(missing_ok=True)  # derived state: rebuilt from the journal
        if all(subject.result_path(e.name).exists() for e in job.entries):
            subject.state = apb.SUBJECT_STATE_READY
            forced_path = subject.forced_path()
            subject.forced = forced_path.exists()
            subject.received[:] = np.load(forced_path) if subject.forced else True
            subject.count = int(subject.received.sum())
            if not job.log.announced_ready(subject.index):
                job.emit(apb.EVENT_TYPE_SUBJECT_READY, subject)  # crashed between result and event
            subject.journal.delete()
            continue
        if job.state == apb.JOB_STATE_ABORTED:
            subject.state = apb.SUBJECT_STATE_ABORTED
            subject.journal.delete()
            continue
        # a forced finish that crashed before its results were in place: the subject is still in progress
        subject.forced_path().unlink(missing_ok=True)
        for record in subject.journal.records():
            fresh = [k for k, i in enumerate(record.sample_indices) if not subject.received[i - subject.first_sample]]
            if fresh:
                job.apply(
                    subject,
                    [record.sample_indices[k] for k in fresh],
                    {name: [arrays[k] for k in fresh] for name, arrays in record.arrays.items()},
                )
        if subject.count == subject.expected and subject.expected > 0:
            job.finish(subject, forced=False, background=False)
    job.check_completed()
    _recount_disk(job)


def _recount_disk(job: Job) -> None:
    """Charges what the job holds on disk after recovery: results of ready subjects, journals (and room for
    results and spills) of subjects in progress."""
    for subject in job.subjects.values():
        if subject.state == apb.SUBJECT_STATE_READY:
            paths = [subject.result_path(e.name) for e in job.entries]
            subject.disk = sum(p.stat().st_size for p in paths if p.exists())
        elif subject.state == apb.SUBJECT_STATE_IN_PROGRESS:
            journal = subject.journal.path.stat().st_size if subject.journal.path.exists() else 0
            subject.disk = journal + subject.room_bytes()
        if job.quota is not None:
            job.quota.force(job.id, subject.disk)
