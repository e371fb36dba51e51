"""An assembly job: predictions of indexed samples posted, validated, journalled and stitched into whole-subject
volumes, subjects finished as they complete.

Readiness is completeness: a job knows every sample index its datasource has, and a subject is ready when all of
its indices have arrived, whatever the order, batching or number of posting clients. Re-posted indices are
acknowledged as duplicates and never counted twice.

Durability: every accepted batch is charged to the disk quota, then appended to its subject's journal and fsync'ed
before it is acknowledged (:mod:`.journal`). A subject is ready (state, event) as soon as its last sample is
journalled; its volume is then made durable in ``results/`` by a background thread, and only after that is its
journal deleted. A crash in between leaves a ready subject without a result but with a complete journal: recovery
(:mod:`.persistence`) replays and finishes it again (without a second ready event). A job that is not ``durable``
(on a server without a state folder, whose jobs end with it) writes no journals, no event log and no metadata, and
fsyncs nothing: the same assembly, acknowledged once applied in memory.

Overlap modes: overwrite (pymia's last write wins, in arrival order), average, and Gaussian-weighted average
(:mod:`.blending`); the latter two keep a float sum per entry and a float32 weight per voxel and divide when the
subject completes. Sums are float32 (float64 when the entry's dtype is float64): pymia always assembles into float64.

This module is over 400 lines because posting, applying and finishing share the one job lock and the quota and
journal order they must keep; finished volumes are served by :mod:`.results`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchwire.service._auth import ANONYMOUS
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    bounded_list,
)
from patchwire.service._limits import DiskQuota
from patchwire.service.assembly.blending import region_weights
from patchwire.service.assembly.journal import confined, fsync_path, record_bytes, write_atomic
from patchwire.service.assembly.memory import MemoryPool
from patchwire.service.assembly.persistence import Event, EventLog, write_metadata
from patchwire.service.assembly.subjects import WEIGHT, EntrySpec, Subject, npy_bytes, write_npy
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2

__all__ = ["COVERAGE_MAX_SAMPLES", "EntrySpec", "Job", "PostResult"]

_log = logging.getLogger(__name__)
COVERAGE_MAX_SAMPLES = 1 << 16
"""Subjects of more samples than this are zeroed before assembly rather than checked for coverage."""


@dataclass
class PostResult:
    accepted: int
    duplicates: int
    ready_subjects: list[int]


class Job:
    """One assembly job. Mutations run under ``lock`` (from executor threads); events notify asyncio waiters."""

    quota: DiskQuota | None = None
    """Where the job's state-folder bytes are charged before they are written (None: not accounted)."""

    def __init__(
        self,
        job_id: str,
        directory: Path,
        spec: spec_pb2.DatasourceSpec,
        source: CompiledDatasource,
        entries: list[EntrySpec],
        mode: str,
        pool: MemoryPool,
        created_ms: int,
        finisher: ThreadPoolExecutor | None = None,
        durable: bool = True,
        owner: str | None = ANONYMOUS.name,
    ) -> None:
        self.id = job_id
        self.owner = owner
        """Name of the identity that created the job: it and administrators may use it. None (a job recovered from
        a state folder written before jobs had owners): administrators only."""
        self.durable = durable
        """Journal, fsync and log what recovery needs (False: nothing outlives the process, nothing is synced)."""
        self.keeps_volumes = not durable and mode == "overwrite"
        """Finished volumes stay where they were assembled (in memory, or spilled to their buffer files beyond the
        budget) instead of being written to ``results/``: a job that ends with the process needs no durable copy, and
        an overwrite buffer already is the volume."""
        self.finisher = finisher
        """Where finished subjects' volumes are made durable (None: in the posting thread)."""
        self.directory = directory
        self.spec = spec
        self.source = source
        self.entries = entries
        self.mode = mode
        self.pool = pool
        self.created_ms = created_ms
        self.state: apb.JobState.ValueType = apb.JOB_STATE_ACTIVE
        self.log = EventLog(directory / "events.jsonl", durable)
        """The job's events (appended under ``lock``, in the same locked step as the change they report)."""
        self.lock = threading.RLock()
        """Guards the job's state, subjects and events; taken after the store's lock and before the memory pool's.
        Never held while waiting for a subject's volume to be written (:attr:`Subject.finished`)."""
        shapes = source.dataset.geometry
        if shapes is None:
            raise FailedPrecondition(
                f"dataset {source.dataset.name!r} has no image properties "
                "(meta/image_props): assembly needs each subject's image size"
            )
        self.subjects: dict[int, Subject] = {}
        self._coverage: dict[tuple[int, ...], bool] = {}
        for s, first, count in zip(source.subject_indices, source.starts, source.counts, strict=True):
            if count == 0:  # no sample (e.g. smaller than one patch): nothing to assemble, nothing to wait for
                continue
            self.subjects[s] = Subject(s, source.dataset.subjects[s], first, count, tuple(shapes[s].size[::-1]), self)

    # -- metadata -------------------------------------------------------------------------------------------------

    @property
    def events(self) -> list[Event]:
        """The job's events in order (:attr:`log`'s)."""
        return self.log.events

    def save_metadata(self) -> None:
        write_metadata(self)

    def emit(self, type_: apb.EventType.ValueType, subject: Subject | None = None) -> None:
        """Logs an event (under :attr:`lock`, in the same locked step as the change it reports)."""
        self.log.append(type_, subject.index if subject else -1, subject.name if subject else "")

    # -- posting --------------------------------------------------------------------------------------------------

    def covers(self, subject: Subject) -> bool:
        """Whether the samples of a subject of this shape together cover every voxel (cached per shape; subjects of
        more than ``COVERAGE_MAX_SAMPLES`` samples, e.g. voxel-wise, are taken not to)."""
        known = self._coverage.get(subject.shape)
        if known is None:
            known = subject.expected <= COVERAGE_MAX_SAMPLES and bool(
                self._covered(subject, range(subject.first_sample, subject.first_sample + subject.expected)).all()
            )
            self._coverage[subject.shape] = known
        return known

    def _covered(self, subject: Subject, samples: Iterable[int]) -> np.ndarray:
        """The voxels of ``samples`` of ``subject`` (a bool volume with a channel axis of 1)."""
        mask = np.zeros((*subject.shape, 1), dtype=bool)
        for i in samples:
            mask[self.source.locate(i)[1]] = True
        return mask

    def _zero_uncovered(self, subject: Subject) -> None:
        """Zeroes the voxels that no received sample covers, in buffers that were not zeroed when they were made."""
        if not subject.unzeroed:
            return
        received = np.flatnonzero(subject.received[: subject.expected]) + subject.first_sample
        missing = ~self._covered(subject, received)[..., 0]
        with self.pool.writing(subject) as buffers:
            for buffer in buffers.values():
                buffer[missing] = 0
        subject.unzeroed = False

    def _region_shape(self, subject: Subject, expr: Any, entry: EntrySpec) -> tuple[int, ...]:
        return tuple(np.broadcast_to(np.empty((), np.uint8), (*subject.shape, entry.channels))[expr].shape)

    def post(
        self, sample_indices: Sequence[int], arrays: Mapping[str, Sequence[np.ndarray]], last_batch: bool
    ) -> PostResult:
        """Validates the whole batch, journals (fsync) what is new, applies it, finishes complete subjects."""
        with self.lock:
            self._check_accepting(sample_indices)
            names = {e.name for e in self.entries}
            if set(arrays) != names:
                raise InvalidArgument(
                    f"batch.fields: expected exactly the entries {sorted(names)}, got [{bounded_list(sorted(arrays))}]"
                )
            for name, values in arrays.items():
                if len(values) != len(sample_indices):
                    raise InvalidArgument(
                        f"batch.fields[{name!r}]: {len(values)} predictions for {len(sample_indices)} sample indices"
                    )
            new: dict[int, list[int]] = {}  # subject -> positions in the batch
            seen: set[int] = set()
            duplicates = 0
            for pos, i in enumerate(sample_indices):
                if not 0 <= i < self.source.length:
                    raise OutOfRange(
                        f"batch.sample_indices[{pos}]: sample index {i} is out of range for job "
                        f"{self.id!r} with {self.source.length} samples"
                    )
                s, expr = self.source.locate(int(i), f"batch.sample_indices[{pos}]")
                subject = self.subjects[s]
                if subject.received[i - subject.first_sample] or i in seen:
                    duplicates += 1
                    continue
                if subject.state != apb.SUBJECT_STATE_PENDING and subject.state != apb.SUBJECT_STATE_IN_PROGRESS:
                    raise FailedPrecondition(
                        f"batch.sample_indices[{pos}]: subject {s} ({subject.name!r}) of job "
                        f"{self.id!r} was already finished before sample {i} arrived"
                    )
                for e in self.entries:
                    pred = arrays[e.name][pos]
                    want = self._region_shape(subject, expr, e)
                    if tuple(pred.shape) != want:
                        raise InvalidArgument(
                            f"batch.fields[{e.name!r}]: prediction for sample {i} has shape {tuple(pred.shape)}, "
                            f"expected {want} (the sample's region of subject {s} plus {e.channels} channel(s), "
                            "channel last)"
                        )
                    if not (np.issubdtype(pred.dtype, np.number) or pred.dtype == np.bool_):
                        raise InvalidArgument(f"batch.fields[{e.name!r}]: dtype {pred.dtype} is not numeric")
                seen.add(i)
                new.setdefault(s, []).append(pos)
            ready: list[int] = []
            charges = self._charge(sample_indices, arrays, new)  # refused here, before anything is journalled
            for s, positions in new.items():
                subject = self.subjects[s]
                subject.disk += charges[s]
                indices = [int(sample_indices[p]) for p in positions]
                accepted = {e.name: [arrays[e.name][p] for p in positions] for e in self.entries}
                if self.durable:  # journalled exactly as posted (dtype included): a replay applies the same
                    subject.journal.append(indices, accepted)
                self.apply(subject, indices, accepted)
                if subject.count == subject.expected:
                    self.finish(subject, forced=False)
                    ready.append(s)
            if last_batch:
                for subject in self.subjects.values():
                    if subject.state == apb.SUBJECT_STATE_IN_PROGRESS:
                        self.finish(subject, forced=True)
                        ready.append(subject.index)
            if ready:
                self.check_completed()
            return PostResult(sum(len(p) for p in new.values()), duplicates, ready)

    def _charge(
        self,
        sample_indices: Sequence[int],
        arrays: Mapping[str, Sequence[np.ndarray]],
        new: Mapping[int, list[int]],
    ) -> dict[int, int]:
        """Charges the disk a batch's new predictions may take (journal records, and room for the results and
        spilled buffers of subjects that get their first prediction) to the quota; the charge per subject."""
        charges: dict[int, int] = {}
        for s, positions in new.items():
            subject = self.subjects[s]
            nbytes = subject.room_bytes() if subject.disk == 0 else 0
            if self.durable:
                nbytes += record_bytes(
                    [sample_indices[p] for p in positions],
                    {e.name: [arrays[e.name][p] for p in positions] for e in self.entries},
                )
            charges[s] = nbytes
        if self.quota is not None:
            self.quota.charge(self.id, sum(charges.values()), f"a batch for job {self.id!r}")
        return charges

    def _settle(self, subject: Subject, kept: int) -> None:
        """Refunds what a subject no longer holds on disk, keeping ``kept`` bytes charged."""
        if self.quota is not None and subject.disk > kept:
            self.quota.refund(self.id, subject.disk - kept)
        subject.disk = min(subject.disk, kept)

    def _check_accepting(self, sample_indices: Sequence[int]) -> None:
        if self.state == apb.JOB_STATE_ABORTED:
            raise FailedPrecondition(f"job {self.id!r} was aborted: it accepts no predictions")
        if self.state == apb.JOB_STATE_COMPLETED:
            # a retried batch whose acknowledgement was lost is fine (all duplicates); anything new is not
            for i in sample_indices:
                if 0 <= i < self.source.length:
                    subject = self.subjects[self.source.locate(int(i))[0]]
                    if subject.received[int(i) - subject.first_sample]:
                        continue
                raise FailedPrecondition(
                    f"job {self.id!r} is completed (every subject is assembled): it accepts "
                    f"no new predictions, got sample {i}"
                )

    def apply(self, subject: Subject, indices: Sequence[int], arrays: Mapping[str, Sequence[np.ndarray]]) -> None:
        with self.pool.writing(subject) as buffers:
            self._apply_to(subject, buffers, buffers.get(WEIGHT), indices, arrays)
        subject.count += len(indices)
        if subject.state == apb.SUBJECT_STATE_PENDING:
            subject.state = apb.SUBJECT_STATE_IN_PROGRESS

    def _apply_to(
        self,
        subject: Subject,
        buffers: Mapping[str, np.ndarray],
        weight: np.ndarray | None,
        indices: Sequence[int],
        arrays: Mapping[str, Sequence[np.ndarray]],
    ) -> None:
        for k, i in enumerate(indices):
            _, expr = self.source.locate(i)
            w = None
            if weight is not None:
                region = weight[expr]
                w = region_weights(region.shape, self.mode) if region.ndim else None  # one voxel weighs 1
                if w is None:
                    weight[expr] = region + np.float32(1)
                else:
                    weight[expr] = region + w
            for e in self.entries:
                pred = arrays[e.name][k]
                buf = buffers[e.name]
                if self.mode == "overwrite":
                    buf[expr] = pred
                elif w is None:
                    buf[expr] = buf[expr] + pred
                else:
                    buf[expr] = buf[expr] + pred * w[..., None]
            subject.received[i - subject.first_sample] = True

    def finish(self, subject: Subject, forced: bool, background: bool = True) -> None:
        """Makes a subject ready. A complete subject's journal holds every sample, so its volume is written in the
        background (``finisher``) and the journal deleted only after that; a forced subject's journal does not,
        so its volume is written first."""
        if forced:
            self._zero_uncovered(subject)
        if self.keeps_volumes:  # nothing to write: the buffers are the volume
            subject.state = apb.SUBJECT_STATE_READY
            subject.forced = forced
            self.emit(apb.EVENT_TYPE_SUBJECT_READY, subject)
            return
        if forced:
            self._write_results(subject, forced=True)
            subject.state = apb.SUBJECT_STATE_READY
            subject.forced = True
            self.emit(apb.EVENT_TYPE_SUBJECT_READY, subject)
            self._drop_journal(subject)
            return
        subject.state = apb.SUBJECT_STATE_READY
        subject.forced = False
        if not self.log.announced_ready(subject.index):
            self.emit(apb.EVENT_TYPE_SUBJECT_READY, subject)  # (a subject finished again on recovery has one)
        subject.finished = threading.Event()
        if background and self.finisher is not None:
            try:
                self.finisher.submit(self._finish_volume, subject)
                return
            except RuntimeError:  # the store is closing: write it here
                pass
        self._finish_volume(subject)
        if subject.finish_error is not None:
            raise RuntimeError(subject.finish_error)

    def _finish_volume(self, subject: Subject) -> None:
        """Writes a ready subject's volume durably, then deletes its journal and buffers (sets ``finished``)."""
        assert subject.finished is not None
        try:
            self._write_results(subject, forced=False)
            # not under the job's lock: nothing else touches a ready subject's files, and posts need not wait
            self._drop_journal(subject)
        except Exception as exc:
            if self.directory.exists():  # (a job deleted meanwhile takes its files with it: nothing to report)
                _log.exception("job %s: writing the volume of subject %d failed", self.id, subject.index)
                subject.finish_error = (
                    f"writing the volume of subject {subject.index} of job {self.id!r} failed ({exc}); its journal "
                    "is kept: a server restart finishes it again"
                )
            else:
                subject.finish_error = f"job {self.id!r} was deleted"
        finally:
            subject.finished.set()

    def _drop_journal(self, subject: Subject) -> None:
        self._settle(subject, subject.result_bytes())  # (refunded first: whoever sees the journal gone sees it)
        subject.journal.delete()
        subject.delete_buffers()

    def _write_results(self, subject: Subject, forced: bool) -> None:
        buffers = self.pool.buffers(subject)
        (self.directory / "results").mkdir(exist_ok=True)
        if forced and self.durable:  # recovery keeps what had arrived: a forced subject's status lists what is missing
            # written before the results, which are what makes a subject ready on recovery
            write_atomic(subject.forced_path(), npy_bytes(subject.received))
        for e in self.entries:
            path = subject.result_path(e.name)
            volume = buffers[e.name] if self.mode == "overwrite" else self._result(buffers, e)
            temporary = path.with_name(f".{path.name}.tmp")
            write_npy(temporary, volume, sync=self.durable)
            temporary.replace(path)
        if self.durable:
            fsync_path(path.parent)

    def _result(self, buffers: Mapping[str, np.ndarray], entry: EntrySpec) -> np.ndarray:
        """The mean of an average or Gaussian job's sums (overwrite buffers are results as they are)."""
        buf = buffers[entry.name]
        weight = buffers[WEIGHT][..., None]
        mean = np.divide(buf, weight, out=np.zeros(buf.shape, dtype=buf.dtype), where=weight > 0)
        if np.issubdtype(entry.dtype, np.integer):
            info = np.iinfo(entry.dtype)
            mean = np.clip(np.rint(mean), info.min, info.max)
        return mean.astype(entry.dtype)

    def check_completed(self) -> None:
        if self.state == apb.JOB_STATE_ACTIVE and all(
            s.state == apb.SUBJECT_STATE_READY for s in self.subjects.values()
        ):
            self.state = apb.JOB_STATE_COMPLETED
            self.save_metadata()
            self.emit(apb.EVENT_TYPE_JOB_COMPLETED)

    # -- other operations -----------------------------------------------------------------------------------------

    def abort(self) -> None:
        self._wait_finished()  # an aborted job holds no buffers, also none of subjects finished just before
        with self.lock:
            if self.state != apb.JOB_STATE_ACTIVE:
                raise FailedPrecondition(
                    f"job {self.id!r} is not active (state {apb.JobState.Name(self.state)}): nothing to abort"
                )
            self.state = apb.JOB_STATE_ABORTED
            self.save_metadata()
            for subject in self.subjects.values():
                if subject.state != apb.SUBJECT_STATE_READY:
                    subject.state = apb.SUBJECT_STATE_ABORTED
                    subject.journal.delete()
                    subject.delete_buffers()
                    self._settle(subject, 0)
            self.emit(apb.EVENT_TYPE_JOB_ABORTED)

    def subject(self, subject_index: int, field: str = "subject_index") -> Subject:
        try:
            return self.subjects[subject_index]
        except KeyError:
            raise NotFound(
                f"{field}: subject {subject_index} is not part of job {self.id!r} (subjects: "
                f"{bounded_list(self.subjects, quote=False)})"
            ) from None

    def resident_bytes(self) -> int:
        """Bytes of the job's buffers in memory now."""
        return self.pool.resident_of(list(self.subjects.values()))

    def _wait_finished(self) -> None:
        """Waits until the volumes of ready subjects being written are (not under ``lock``: writing needs it)."""
        for subject in list(self.subjects.values()):
            if subject.finished is not None:
                subject.finished.wait()

    def delete_files(self) -> None:
        self._wait_finished()  # volumes being written would otherwise land in a removed folder
        with self.lock:
            for subject in self.subjects.values():
                self.pool.release(subject, spill=False)
            # only ever a job's own folder, directly under the store's jobs folder
            shutil.rmtree(confined(self.directory.parent, self.directory.name), ignore_errors=True)
