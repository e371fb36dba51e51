"""Serving finished volumes: as arrays (:func:`result`), as the files that hold them (:func:`result_files`), or as
the server's own memory lent to a same-host client (:func:`lend_volume`).

Fetching a ready subject serves its buffers as they are (overwrite mode, where the buffer is the result) or waits
for its volume (average modes). Volumes a job keeps (:attr:`Job.keeps_volumes`) are served from their buffers in
memory, or from the buffer files they were spilled to.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from patchwire.service._errors import FailedPrecondition, Internal
from patchwire.service.assembly.subjects import Subject, read_only
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import shared_memory

if TYPE_CHECKING:
    from patchwire.service.assembly.job import Job

__all__ = ["lend_volume", "result", "result_files"]


def result(job: Job, subject_index: int) -> dict[str, np.ndarray]:
    """A ready subject's volume, per entry (read-only); waits while an average volume is being written."""
    subject = job.subject(subject_index)
    if subject.state != apb.SUBJECT_STATE_READY:
        raise FailedPrecondition(
            f"subject {subject_index} ({subject.name!r}) of job {job.id!r} is not ready: {subject.count} of "
            f"{subject.expected} samples received ({apb.SubjectState.Name(subject.state)})"
        )
    if job.keeps_volumes:
        return _kept_volume(job, subject)
    if subject.finished is not None and not subject.finished.is_set():
        mapped = subject.mapped  # (one read: the finisher or the pool may drop it meanwhile)
        if job.mode == "overwrite" and mapped is not None and not subject.forced:
            # complete and never written again: the buffers are the volume, also before it is durable (its
            # journal is) and after the finisher renames their files (a mapping outlives a rename)
            return {e.name: read_only(mapped[e.name]) for e in job.entries}
        subject.finished.wait()
    if subject.finish_error is not None:
        raise Internal(subject.finish_error)
    return {e.name: np.load(subject.result_path(e.name), mmap_mode="r") for e in job.entries}


def result_files(job: Job, subject_index: int) -> dict[str, np.memmap] | None:
    """The finished volume as memory-mapped result files, whose content never changes again; None while a
    journalled subject's volume is still being made durable (its buffers hold it: see :func:`result`). A job
    without a state folder finishes a volume with a rename: that is waited for."""
    subject = job.subject(subject_index)
    volume = result(job, subject_index)  # ready, and nothing failed so far (or raise)
    if job.keeps_volumes:  # in memory (None: the caller copies it) or spilled to files that never change again
        files = {name: v for name, v in volume.items() if isinstance(v, np.memmap)}
        return files if len(files) == len(volume) else None
    if subject.finished is not None and not subject.finished.is_set():
        if job.durable:
            return None
        subject.finished.wait()
        if subject.finish_error is not None:
            raise Internal(subject.finish_error)
    return {e.name: np.load(subject.result_path(e.name), mmap_mode="r") for e in job.entries}


def lend_volume(job: Job, subject_index: int) -> dict[str, tuple[int, bytes]] | None:
    """A kept volume in memfds, each entry's as a new read-only descriptor (the caller owns it) for a client on
    this host to map, under a lease that keeps the memory from being reused until the client gives it back; None
    where the volume is elsewhere (spilled, in anonymous memory, or not kept)."""
    subject = job.subject(subject_index)
    result(job, subject_index)  # ready, and nothing failed so far (or raise)
    if not job.keeps_volumes:
        return None
    with job.pool.lock:
        if subject.mapped is None:
            return None
        memories = dict(zip(subject.buffer_specs(), subject.memory, strict=True))
        if not all(m.fd is not None for m in memories.values()):
            return None
        out: dict[str, tuple[int, bytes]] = {}
        try:
            for e in job.entries:
                memory = memories[e.name]
                assert memory.fd is not None
                out[e.name] = (shared_memory.reopen_read_only(memory.fd), job.pool.lend(memory))
        except BaseException:
            for fd, _ in out.values():
                os.close(fd)
            raise
        return out


def _kept_volume(job: Job, subject: Subject) -> dict[str, np.ndarray]:
    """A kept volume: read-only views of its buffers in memory, or its spilled buffer files mapped read-only.
    (A ready subject's buffers are never read back into memory once spilled: its files stay as they are.)"""
    with job.pool.lock:
        mapped = subject.mapped
        if mapped is not None:
            return {e.name: read_only(mapped[e.name]) for e in job.entries}
        return {e.name: np.load(subject.buffer_path(e.name), mmap_mode="r") for e in job.entries}
