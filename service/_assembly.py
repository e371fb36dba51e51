"""Server-side assembly: predictions of indexed samples stitched back into whole-subject volumes.

Readiness is completeness: a job knows every sample index its datasource has, and a subject is ready when all of
its indices have arrived, whatever the order, batching or number of posting clients. Re-posted indices are
acknowledged as duplicates and never counted twice.

Durability: every accepted batch is appended to its subject's journal and fsync'ed before it is acknowledged
(``_journal``); job metadata, events and finished volumes are written atomically. On start the store reloads every
job from ``state_dir`` and rebuilds partial volumes by replaying the journals, so a ``kill -9`` loses nothing
that was acknowledged. A subject is ready (state, event) as soon as its last sample is journalled; its volume is
then made durable in ``results/`` by a background thread, and only after that is its journal deleted. A crash in
between leaves a ready subject without a result but with a complete journal: recovery replays and finishes it
again (without a second ready event). Fetching a ready subject serves its buffers as they are (overwrite mode,
where the buffer is the result) or waits for its volume (average modes).

A store that is not ``durable`` (a server without a state folder, whose jobs end with it) writes no journals, no
event log and no metadata, and fsyncs nothing: the same assembly, acknowledged once applied in memory.

Memory: partial volumes live in anonymous memory (transparent huge pages where the kernel offers them); a
:class:`BufferPool` keeps at most ``budget`` bytes of them in memory and spills the least recently used to files
under ``state_dir`` (read back when their subject gets predictions again), so resident memory stays near the budget
however many subjects are in flight. A single subject larger than the budget is held alone. Buffers are derived
state: the journals, not the spilled files, are what recovery reads. Volumes a store without a state folder keeps
(``overwrite``) are assembled in memfds where the server shares memory, so that a client on its host maps a finished
volume instead of receiving a copy (:meth:`Job.lend_volume`); such memory is reused only once every client that
mapped it has given its lease back.

Overlap modes: overwrite (pymia's last write wins, in arrival order), average, and Gaussian-weighted average;
the latter two keep a float sum per entry and a float32 weight per voxel and divide when the subject completes.
Sums are float32 (float64 when the entry's dtype is float64): pymia always assembles into float64.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import mmap
import os
import re
import resource
import shutil
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchwire.service._auth import ANONYMOUS, Identity
from patchwire.service._blending import region_weights
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    bounded,
    bounded_list,
)
from patchwire.service._journal import Journal, confined, fsync_path, record_bytes, write_atomic
from patchwire.service._limits import DiskQuota, Limits, exhausted
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2
from patchwire.wire import shared_memory, tensors
from patchwire.wire.names import OVERLAP_MODES, overlap_mode_name

__all__ = ["AssemblyStore", "EntrySpec", "Job", "PostResult"]

_log = logging.getLogger(__name__)
SHARED_VOLUME_MIN_BYTES = 4 << 20
"""Kept volumes at least this large are assembled in memory that a client on the server's host can map (a memfd):
fetching them copies nothing. Smaller ones are copied to the client (cheap; and each memfd holds two descriptors)."""
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Job ids name their folder under ``state_dir/jobs``: a letter or digit first (never ``.`` or ``..``), no ``/``."""
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
"""Entry names are part of buffer and result file names: no ``/``, no leading ``.``, at most 64 characters."""


@dataclass(frozen=True)
class EntrySpec:
    name: str
    channels: int
    dtype: np.dtype[Any]


@dataclass
class PostResult:
    accepted: int
    duplicates: int
    ready_subjects: list[int]


@dataclass
class Event:
    sequence: int
    type: apb.EventType.ValueType
    subject_index: int = -1
    subject: str = ""
    time_unix_ms: int = 0


class Memory(mmap.mmap):
    """The memory under a buffer: anonymous (``fd`` None), or a memfd that a client on the server's host can map
    (a read-only descriptor of it is handed over, see :meth:`Job.lend_volume`); ``leases``: the leases of it that
    clients hold (:meth:`BufferPool.lend`)."""

    fd: int | None = None
    leases: set[bytes]


class BufferPool:
    """Keeps at most ``budget`` bytes of partial-volume buffers in memory; spills the least recently used to files.

    The memory of buffers dropped while no array views them any more is kept for later subjects' buffers, within the
    same budget (spare memory goes first when buffers need the room): writing into pages the process already has is
    several times cheaper than into fresh ones on the machines measured, where first touches also varied 2-4x.

    With ``share``, kept volumes (:attr:`Job.keeps_volumes`) of at least ``SHARED_VOLUME_MIN_BYTES`` live in memfds
    that a same-host client maps when it fetches them, under a lease (:meth:`lend`). Memory a client holds a lease of
    is never reused: dropped, it is held (within the budget, least recently dropped given up first) until its leases
    come back (:meth:`give_back`), and given up otherwise, its pages then living on in the clients' mappings."""

    def __init__(self, budget: int, share: bool = False) -> None:
        self.budget = budget
        self.share = share and hasattr(os, "memfd_create")
        self.memfds = 0
        """Memfds open (each holds two descriptors: at most a quarter of the process's limit is used for them)."""
        self._memfds_max = _descriptor_limit() // 4
        self._memfds_lock = threading.RLock()  # (a collection inside a locked block may free a memfd: reentered)
        self._open: OrderedDict[int, tuple[Subject, int]] = OrderedDict()
        self.lock = threading.Lock()
        self.resident = 0
        self._spare: list[Memory] = []
        self.spare_bytes = 0
        self._held: list[Memory] = []
        self.held_bytes = 0
        self._leases: dict[bytes, Memory] = {}

    def zeros(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], zero: bool = True, shareable: bool = False
    ) -> tuple[np.ndarray, Memory]:
        """A buffer and the memory under it: spare memory of about its size, or new (call under the lock). Spare
        memory holds what an earlier buffer left: it is zeroed unless ``zero`` is False (the caller overwrites every
        byte before anything reads it). ``shareable``: a kept volume, for a memfd where the pool shares them."""
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        shareable = shareable and self.share and nbytes >= SHARED_VOLUME_MIN_BYTES
        fits = [
            m for m in self._spare if nbytes <= len(m) <= nbytes + nbytes // 4 and (m.fd is not None or not shareable)
        ]
        if fits:
            memory = min(fits, key=lambda m: (len(m), m.fd is not None))
            self._spare.remove(memory)
            self.spare_bytes -= len(memory)
            if zero:
                np.frombuffer(memory, dtype=np.uint8, count=nbytes)[:] = 0
        elif shareable and self.memfds < self._memfds_max:
            memory = _shareable(nbytes, self._memfd_closed)
            with self._memfds_lock:
                self.memfds += memory.fd is not None
        else:
            memory = _anonymous(nbytes)
        return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape), memory

    def _memfd_closed(self) -> None:
        with self._memfds_lock:
            self.memfds -= 1

    def _recycle(self, memories: list[Memory]) -> None:
        """Keeps the memory of dropped buffers that nothing views any more, as far as the budget allows; holds
        memory that clients hold leases of."""
        while memories:
            memory = memories.pop()
            if memory.leases:
                if self.resident + self.spare_bytes + self.held_bytes + len(memory) <= self.budget:
                    self._held.append(memory)
                    self.held_bytes += len(memory)
                else:
                    self._give_up(memory)
            # referenced here and by the call's argument only: no array is left on it
            elif (
                sys.getrefcount(memory) == 2
                and self.resident + self.spare_bytes + self.held_bytes + len(memory) <= self.budget
            ):
                self._spare.append(memory)
                self.spare_bytes += len(memory)

    def _give_up(self, memory: Memory) -> None:
        """Forgets leased memory: its leases come back to nothing, and it is freed with the last mapping of it."""
        for token in memory.leases:
            self._leases.pop(token, None)
        memory.leases = set()

    def _make_room(self, need: int) -> None:
        while (self._spare or self._held) and self.resident + self.spare_bytes + self.held_bytes + need > self.budget:
            if self._spare:
                self.spare_bytes -= len(self._spare.pop(0))
            else:
                held = self._held.pop(0)
                self.held_bytes -= len(held)
                self._give_up(held)

    def lend(self, memory: Memory) -> bytes:
        """A new lease of ``memory`` for a client that maps it (call under the lock)."""
        token = os.urandom(16)
        memory.leases.add(token)
        self._leases[token] = memory
        return token

    def give_back(self, tokens: Iterable[bytes]) -> int:
        """Ends leases (unknown ones are ignored); memory held for them alone becomes spare. Returns how many were
        outstanding."""
        released = 0
        freed: list[Memory] = []
        with self.lock:
            for token in tokens:
                memory = self._leases.pop(token, None)
                if memory is None:
                    continue
                released += 1
                memory.leases.discard(token)
                if not memory.leases and any(m is memory for m in self._held):
                    self._held.remove(memory)
                    self.held_bytes -= len(memory)
                    freed.append(memory)
            memory = None  # (the loop's reference: the recycling below counts what views each memory)
            self._recycle(freed)
        return released

    def buffers(self, subject: Subject) -> dict[str, np.ndarray]:
        """The subject's buffers, for reading (see :meth:`writing`)."""
        with self.lock:
            return self._buffers(subject)

    @contextlib.contextmanager
    def writing(self, subject: Subject) -> Iterator[dict[str, np.ndarray]]:
        """The subject's buffers, kept in memory until the block ends: a spill meanwhile (for another job's subject,
        from another thread) would lose what is written after it."""
        with self.lock:
            buffers = self._buffers(subject)
            subject.writers += 1
        try:
            yield buffers
        finally:
            with self.lock:
                subject.writers -= 1

    def _buffers(self, subject: Subject) -> dict[str, np.ndarray]:
        key = id(subject)
        if key in self._open:
            self._open.move_to_end(key)
            assert subject.mapped is not None
            return subject.mapped
        need = subject.buffer_bytes()
        self._make_room(need)
        for old_key, (old, nbytes) in list(self._open.items()):  # least recently used first
            if self.resident + need <= self.budget:
                break
            if not old.writers:
                del self._open[old_key]
                self.resident -= nbytes
                self._recycle(old.unmap())
        self._make_room(need)
        mapped = subject.map(self.zeros)
        self._open[key] = (subject, need)
        self.resident += need
        return mapped

    def release(self, subject: Subject, spill: bool) -> None:
        with self.lock:
            item = self._open.pop(id(subject), None)
            if item is not None:
                self.resident -= item[1]
                self._recycle(subject.unmap(spill))

    def resident_of(self, subjects: Sequence[Subject]) -> int:
        with self.lock:
            ids = {id(s) for s in subjects}
            return sum(n for key, (_, n) in self._open.items() if key in ids)


@dataclass
class Subject:
    index: int
    name: str
    first_sample: int
    expected: int
    shape: tuple[int, ...]
    """Numpy shape (z, y, x) of the assembled volume (pymia: the image properties' size, reversed)."""
    job: Job
    received: np.ndarray = field(init=False)
    count: int = 0
    state: apb.SubjectState.ValueType = apb.SUBJECT_STATE_PENDING
    forced: bool = False
    mapped: dict[str, np.ndarray] | None = None
    _memory: list[Memory] = field(default_factory=list, init=False, repr=False)
    writers: int = field(default=0, init=False)
    unzeroed: bool = field(default=False, init=False)
    """The buffers may hold an earlier buffer's bytes where no sample has been written yet."""
    """Threads writing into the buffers (which are not spilled meanwhile)."""
    finished: threading.Event | None = None
    """Set once the volume of a ready subject is durable in ``results/`` (None: nothing pending)."""
    finish_error: str | None = None
    disk: int = field(default=0, init=False)
    """Bytes charged to the job's disk quota for this subject: its journal, and room for its results and spilled
    buffers from its first prediction on; only the results once its journal and buffers are deleted."""

    def __post_init__(self) -> None:
        self.received = np.zeros(self.expected, dtype=bool)
        self.journal = Journal(self.job.directory / "journals" / f"{self.index}.journal")

    def buffer_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
        specs: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        for e in self.job.entries:
            if self.job.mode == "overwrite":
                dtype = e.dtype
            else:
                dtype = np.dtype(np.float64) if e.dtype == np.float64 else np.dtype(np.float32)
            specs[e.name] = ((*self.shape, e.channels), dtype)
        if self.job.mode != "overwrite":
            specs["__weight__"] = (self.shape, np.dtype(np.float32))
        return specs

    def buffer_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dt.itemsize for shape, dt in self.buffer_specs().values())

    def _buffer_path(self, key: str) -> Path:
        return self.job.directory / "buffers" / f"{self.index}.{key}.npy"

    def map(
        self, zeros: Callable[[tuple[int, ...], np.dtype[Any], bool, bool], tuple[np.ndarray, Memory]]
    ) -> dict[str, np.ndarray]:
        """The buffers in memory (from ``zeros``): zeros, or what a spill left in their files (removed once read).
        Overwrite buffers whose samples cover every voxel are not zeroed first (:meth:`Job.covers`); ``unzeroed``
        says so until a forced finish zeroes what no received sample covered."""
        out: dict[str, np.ndarray] = {}
        self._memory = []
        spilled = all(self._buffer_path(key).exists() for key in self.buffer_specs())
        if not spilled:  # (a spilled buffer comes back as it was, zeroed or not)
            self.unzeroed = self.job.mode == "overwrite" and self.job.covers(self)
        zero = not spilled and not self.unzeroed
        for key, (shape, dtype) in self.buffer_specs().items():
            out[key], memory = zeros(shape, dtype, zero, self.job.keeps_volumes)
            self._memory.append(memory)
            path = self._buffer_path(key)
            if path.exists():
                _read_npy(path, out[key])
                path.unlink()
        self.mapped = out
        return out

    def unmap(self, spill: bool = True) -> list[Memory]:
        """Drops the buffers, first writing them to their files with ``spill``; returns the memory under them (freed
        once no array views it, e.g. a volume being fetched)."""
        if self.mapped is not None:
            if spill:
                for key, buffer in self.mapped.items():
                    _write_npy(self._buffer_path(key), buffer, sync=False)
            self.mapped = None
        memory, self._memory = self._memory, []
        return memory

    def delete_buffers(self) -> None:
        self.job.pool.release(self, spill=False)
        for key in self.buffer_specs():
            self._buffer_path(key).unlink(missing_ok=True)

    def result_path(self, entry: str) -> Path:
        return self.job.directory / "results" / f"{self.index}.{entry}.npy"

    def result_bytes(self) -> int:
        """Bytes of the subject's result files (an upper bound: the ``.npy`` header is taken as 128 bytes)."""
        return sum(int(np.prod(self.shape)) * e.channels * e.dtype.itemsize + 128 for e in self.job.entries)

    def room_bytes(self) -> int:
        """Disk a subject may take besides its journal: results, and buffers spilled meanwhile."""
        return self.result_bytes() + self.buffer_bytes() + 128 * len(self.buffer_specs())

    def missing(self, limit: int) -> list[int]:
        local = np.flatnonzero(~self.received[: self.expected])[:limit]
        return [int(i) + self.first_sample for i in local]


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
        pool: BufferPool,
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
        self.events: list[Event] = []
        self.lock = threading.RLock()
        self.listeners: list[Callable[[], None]] = []
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

    def _metadata(self) -> dict[str, Any]:
        return {
            "job_id": self.id,
            "spec": base64.b64encode(self.spec.SerializeToString(deterministic=True)).decode(),
            "entries": [[e.name, e.channels, e.dtype.str] for e in self.entries],
            "mode": self.mode,
            "state": int(self.state),
            "created_ms": self.created_ms,
            "owner": self.owner,
        }

    def save_metadata(self) -> None:
        if not self.durable:
            return
        write_atomic(self.directory / "job.json", json.dumps(self._metadata(), indent=1).encode())

    def _emit(self, type_: apb.EventType.ValueType, subject: Subject | None = None) -> None:
        event = Event(
            len(self.events) + 1,
            type_,
            subject.index if subject else -1,
            subject.name if subject else "",
            int(time.time() * 1000),
        )
        if self.durable:
            with open(self.directory / "events.jsonl", "a") as f:
                f.write(json.dumps(event.__dict__) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.events.append(event)

    # -- posting --------------------------------------------------------------------------------------------------

    def covers(self, subject: Subject) -> bool:
        """Whether the samples of a subject of this shape together cover every voxel (cached per shape; subjects of
        more than ``_COVERAGE_MAX_SAMPLES`` samples, e.g. voxel-wise, are taken not to)."""
        known = self._coverage.get(subject.shape)
        if known is None:
            known = subject.expected <= _COVERAGE_MAX_SAMPLES and bool(
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
                self._apply(subject, indices, accepted)
                if subject.count == subject.expected:
                    self._finish(subject, forced=False)
                    ready.append(s)
            if last_batch:
                for subject in self.subjects.values():
                    if subject.state == apb.SUBJECT_STATE_IN_PROGRESS:
                        self._finish(subject, forced=True)
                        ready.append(subject.index)
            if ready:
                self._check_completed()
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

    def _apply(self, subject: Subject, indices: Sequence[int], arrays: Mapping[str, Sequence[np.ndarray]]) -> None:
        with self.pool.writing(subject) as buffers:
            self._apply_to(subject, buffers, buffers.get("__weight__"), indices, arrays)
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

    def _finish(self, subject: Subject, forced: bool, background: bool = True) -> None:
        """Makes a subject ready. A complete subject's journal holds every sample, so its volume is written in the
        background (``finisher``) and the journal deleted only after that; a forced subject's journal does not,
        so its volume is written first."""
        if forced:
            self._zero_uncovered(subject)
        if self.keeps_volumes:  # nothing to write: the buffers are the volume
            subject.state = apb.SUBJECT_STATE_READY
            subject.forced = forced
            self._emit(apb.EVENT_TYPE_SUBJECT_READY, subject)
            return
        if forced:
            self._write_results(subject, forced=True)
            subject.state = apb.SUBJECT_STATE_READY
            subject.forced = True
            self._emit(apb.EVENT_TYPE_SUBJECT_READY, subject)
            self._drop_journal(subject)
            return
        subject.state = apb.SUBJECT_STATE_READY
        subject.forced = False
        if not any(e.type == apb.EVENT_TYPE_SUBJECT_READY and e.subject_index == subject.index for e in self.events):
            self._emit(apb.EVENT_TYPE_SUBJECT_READY, subject)  # (a subject finished again on recovery has one)
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
            write_atomic(self.directory / "results" / f"{subject.index}.forced.npy", _npy(subject.received))
        for e in self.entries:
            path = subject.result_path(e.name)
            volume = buffers[e.name] if self.mode == "overwrite" else self._result(buffers, e)
            temporary = path.with_name(f".{path.name}.tmp")
            _write_npy(temporary, volume, sync=self.durable)
            temporary.replace(path)
        if self.durable:
            fsync_path(path.parent)

    def _result(self, buffers: Mapping[str, np.ndarray], entry: EntrySpec) -> np.ndarray:
        """The mean of an average or Gaussian job's sums (overwrite buffers are results as they are)."""
        buf = buffers[entry.name]
        weight = buffers["__weight__"][..., None]
        mean = np.divide(buf, weight, out=np.zeros(buf.shape, dtype=buf.dtype), where=weight > 0)
        if np.issubdtype(entry.dtype, np.integer):
            info = np.iinfo(entry.dtype)
            mean = np.clip(np.rint(mean), info.min, info.max)
        return mean.astype(entry.dtype)

    def _check_completed(self) -> None:
        if self.state == apb.JOB_STATE_ACTIVE and all(
            s.state == apb.SUBJECT_STATE_READY for s in self.subjects.values()
        ):
            self.state = apb.JOB_STATE_COMPLETED
            self.save_metadata()
            self._emit(apb.EVENT_TYPE_JOB_COMPLETED)

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
            self._emit(apb.EVENT_TYPE_JOB_ABORTED)

    def subject(self, subject_index: int, field: str = "subject_index") -> Subject:
        try:
            return self.subjects[subject_index]
        except KeyError:
            raise NotFound(
                f"{field}: subject {subject_index} is not part of job {self.id!r} (subjects: "
                f"{bounded_list(self.subjects, quote=False)})"
            ) from None

    def result(self, subject_index: int) -> dict[str, np.ndarray]:
        subject = self.subject(subject_index)
        if subject.state != apb.SUBJECT_STATE_READY:
            raise FailedPrecondition(
                f"subject {subject_index} ({subject.name!r}) of job {self.id!r} is not ready: {subject.count} of "
                f"{subject.expected} samples received ({apb.SubjectState.Name(subject.state)})"
            )
        if self.keeps_volumes:
            return self._kept_volume(subject)
        if subject.finished is not None and not subject.finished.is_set():
            mapped = subject.mapped  # (one read: the finisher or the pool may drop it meanwhile)
            if self.mode == "overwrite" and mapped is not None and not subject.forced:
                # complete and never written again: the buffers are the volume, also before it is durable (its
                # journal is) and after the finisher renames their files (a mapping outlives a rename)
                return {e.name: _read_only(mapped[e.name]) for e in self.entries}
            subject.finished.wait()
        if subject.finish_error is not None:
            raise Internal(subject.finish_error)
        return {e.name: np.load(subject.result_path(e.name), mmap_mode="r") for e in self.entries}

    def result_files(self, subject_index: int) -> dict[str, np.memmap] | None:
        """The finished volume as memory-mapped result files, whose content never changes again; None while a
        journalled subject's volume is still being made durable (its buffers hold it: see :meth:`result`). A job
        without a state folder finishes a volume with a rename: that is waited for."""
        subject = self.subject(subject_index)
        volume = self.result(subject_index)  # ready, and nothing failed so far (or raise)
        if self.keeps_volumes:  # in memory (None: the caller copies it) or spilled to files that never change again
            files = {name: v for name, v in volume.items() if isinstance(v, np.memmap)}
            return files if len(files) == len(volume) else None
        if subject.finished is not None and not subject.finished.is_set():
            if self.durable:
                return None
            subject.finished.wait()
            if subject.finish_error is not None:
                raise Internal(subject.finish_error)
        return {e.name: np.load(subject.result_path(e.name), mmap_mode="r") for e in self.entries}

    def lend_volume(self, subject_index: int) -> dict[str, tuple[int, bytes]] | None:
        """A kept volume in memfds, each entry's as a new read-only descriptor (the caller owns it) for a client on
        this host to map, under a lease that keeps the memory from being reused until the client gives it back; None
        where the volume is elsewhere (spilled, in anonymous memory, or not kept)."""
        subject = self.subject(subject_index)
        self.result(subject_index)  # ready, and nothing failed so far (or raise)
        if not self.keeps_volumes:
            return None
        with self.pool.lock:
            if subject.mapped is None:
                return None
            memories = dict(zip(subject.buffer_specs(), subject._memory, strict=True))
            if not all(m.fd is not None for m in memories.values()):
                return None
            out: dict[str, tuple[int, bytes]] = {}
            try:
                for e in self.entries:
                    memory = memories[e.name]
                    assert memory.fd is not None
                    out[e.name] = (shared_memory.reopen_read_only(memory.fd), self.pool.lend(memory))
            except BaseException:
                for fd, _ in out.values():
                    os.close(fd)
                raise
            return out

    def _kept_volume(self, subject: Subject) -> dict[str, np.ndarray]:
        """A kept volume: read-only views of its buffers in memory, or its spilled buffer files mapped read-only.
        (A ready subject's buffers are never read back into memory once spilled: its files stay as they are.)"""
        with self.pool.lock:
            mapped = subject.mapped
            if mapped is not None:
                return {e.name: _read_only(mapped[e.name]) for e in self.entries}
            return {e.name: np.load(subject._buffer_path(e.name), mmap_mode="r") for e in self.entries}

    def info(self) -> apb.JobInfo:
        return apb.JobInfo(
            job_id=self.id,
            dataset=self.source.dataset.name,
            state=self.state,
            entries=[
                apb.OutputEntry(name=e.name, channels=e.channels, dtype=_dtype_proto(e.dtype)) for e in self.entries
            ],
            overlap_mode=OVERLAP_MODES[self.mode],
            expected_samples=self.source.length,
            received_samples=sum(s.count for s in self.subjects.values()),
            subject_count=len(self.subjects),
            ready_subject_count=sum(s.state == apb.SUBJECT_STATE_READY for s in self.subjects.values()),
            last_event_sequence=len(self.events),
            resident_buffer_bytes=self.pool.resident_of(list(self.subjects.values())),
            journalled=self.durable,
        )

    def subject_status(self, max_missing: int) -> list[apb.SubjectStatus]:
        out = []
        for s in self.subjects.values():
            out.append(
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
            )
        return out

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

    # -- recovery -------------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Rebuilds state from disk: events, finished subjects, and partial volumes replayed from journals."""
        events_path = self.directory / "events.jsonl"
        if events_path.exists():
            text = events_path.read_text()
            lines = text.splitlines()
            for line in lines:
                try:
                    self.events.append(Event(**json.loads(line)))
                except (ValueError, TypeError):
                    break
            if len(self.events) < len(lines) or (text and not text.endswith("\n")):
                # cut the torn tail off: events appended after it would otherwise be glued to it and lost
                _log.warning("job %s: dropping a torn event line", self.id)
                write_atomic(events_path, "".join(json.dumps(e.__dict__) + "\n" for e in self.events).encode())
        for subject in self.subjects.values():
            for key in subject.buffer_specs():
                subject._buffer_path(key).unlink(missing_ok=True)  # derived state: rebuilt from the journal
            if all(subject.result_path(e.name).exists() for e in self.entries):
                subject.state = apb.SUBJECT_STATE_READY
                forced_path = self.directory / "results" / f"{subject.index}.forced.npy"
                subject.forced = forced_path.exists()
                subject.received[:] = np.load(forced_path) if subject.forced else True
                subject.count = int(subject.received.sum())
                if not any(
                    ev.type == apb.EVENT_TYPE_SUBJECT_READY and ev.subject_index == subject.index for ev in self.events
                ):
                    self._emit(apb.EVENT_TYPE_SUBJECT_READY, subject)  # crashed between result and event
                subject.journal.delete()
                continue
            if self.state == apb.JOB_STATE_ABORTED:
                subject.state = apb.SUBJECT_STATE_ABORTED
                subject.journal.delete()
                continue
            # a forced finish that crashed before its results were in place: the subject is still in progress
            (self.directory / "results" / f"{subject.index}.forced.npy").unlink(missing_ok=True)
            for record in subject.journal.records():
                fresh = [
                    k for k, i in enumerate(record.sample_indices) if not subject.received[i - subject.first_sample]
                ]
                if fresh:
                    self._apply(
                        subject,
                        [record.sample_indices[k] for k in fresh],
                        {name: [arrays[k] for k in fresh] for name, arrays in record.arrays.items()},
                    )
            if subject.count == subject.expected and subject.expected > 0:
                self._finish(subject, forced=False, background=False)
        self._check_completed()
        self._recount_disk()

    def _recount_disk(self) -> None:
        """Charges what the job holds on disk after recovery: results of ready subjects, journals (and room for
        results and spills) of subjects in progress."""
        for subject in self.subjects.values():
            if subject.state == apb.SUBJECT_STATE_READY:
                paths = [subject.result_path(e.name) for e in self.entries]
                subject.disk = sum(p.stat().st_size for p in paths if p.exists())
            elif subject.state == apb.SUBJECT_STATE_IN_PROGRESS:
                journal = subject.journal.path.stat().st_size if subject.journal.path.exists() else 0
                subject.disk = journal + subject.room_bytes()
            if self.quota is not None:
                self.quota.force(self.id, subject.disk)


_COVERAGE_MAX_SAMPLES = 1 << 16
"""Subjects of more samples than this are zeroed before assembly rather than checked for coverage."""


def _anonymous(nbytes: int) -> Memory:
    """Zeroed memory of its own, returned to the system once nothing references it. Huge pages (where the kernel
    offers them for the asking) make a first write into a buffer several times cheaper than 4 KiB pages, and far
    cheaper than into a memory-mapped file on disk, whose fresh pages are faulted in one by one: a 64^3 patch is
    thousands of rows of a few hundred bytes, each in another page."""
    memory = Memory(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.leases = set()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def _shareable(nbytes: int, closed: Callable[[], None]) -> Memory:
    """Zeroed memory in a memfd of its own, which a client on this host can map; the memfd is closed with the memory
    (then ``closed`` is called). Anonymous memory where no memfd can be made."""
    try:
        fd = os.memfd_create("patchwire-volume", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        _log.warning("assembling in anonymous memory, which fetching copies: no memfd (%s)", exc)
        return _anonymous(nbytes)
    try:
        os.ftruncate(fd, nbytes)
        memory = Memory(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    try:
        # its size is fixed for good, and only this mapping writes it: a client it is lent to can map it privately,
        # never shrink it under the server's writes nor write into it (whatever it reopens it as)
        shared_memory.seal_for_lending(fd)
    except OSError as exc:
        memory.close()
        os.close(fd)
        _log.warning("assembling in anonymous memory, which fetching copies: memfds cannot be sealed (%s)", exc)
        return _anonymous(nbytes)
    memory.fd = fd
    memory.leases = set()
    weakref.finalize(memory, _close_memfd, fd, closed)
    return memory


def _close_memfd(fd: int, closed: Callable[[], None]) -> None:
    os.close(fd)
    closed()


def _descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def _write_npy(path: Path, array: np.ndarray, sync: bool) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _read_npy(path: Path, into: np.ndarray) -> None:
    """Reads an ``.npy`` file written by :func:`_write_npy` into ``into`` (no mapping: no file pages in the RSS)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if (shape, fortran, dtype) != (into.shape, False, into.dtype):
            raise Internal(f"{path} holds a {dtype}{shape} array, expected {into.dtype}{into.shape}")
        view = into.reshape(-1).view(np.uint8).data
        while len(view):
            n = f.readinto(view)
            if not n:
                raise Internal(f"{path} ends {len(view)} bytes early")
            view = view[n:]


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view(np.ndarray)
    view.flags.writeable = False
    return view


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _dtype_proto(dtype: np.dtype[Any]) -> Any:

    return tensors.dtype_to_proto(dtype)


class AssemblyStore:
    """Every job of a server, persisted under ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        resolve: Callable[[spec_pb2.DatasourceSpec], CompiledDatasource],
        memory_budget: int,
        durable: bool = True,
        share_volumes: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.limits = limits if limits is not None else Limits()
        self.quota = DiskQuota(self.limits)
        """Bytes the jobs hold in ``state_dir``, charged before they are written."""
        self.durable = durable
        self.resolve = resolve
        self.pool = BufferPool(memory_budget, share=share_volumes)
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchwire-finish")
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        (state_dir / "jobs").mkdir(parents=True, exist_ok=True)

    def load(self) -> None:
        """Reloads every job found under ``state_dir`` (after a restart)."""
        for meta_path in sorted((self.state_dir / "jobs").glob("*/job.json")):
            try:
                meta = json.loads(meta_path.read_text())
                spec = spec_pb2.DatasourceSpec.FromString(base64.b64decode(meta["spec"]))
                job = Job(
                    meta["job_id"],
                    meta_path.parent,
                    spec,
                    self.resolve(spec),
                    [EntrySpec(n, int(c), np.dtype(d)) for n, c, d in meta["entries"]],
                    meta["mode"],
                    self.pool,
                    int(meta["created_ms"]),
                    self.finisher,
                    owner=meta.get("owner"),
                )
                job.quota = self.quota
                job.state = apb.JobState.ValueType(int(meta["state"]))
                job.recover()
            except Exception:
                _log.exception("could not recover assembly job in %s; its files are kept", meta_path.parent)
                self.quota.drop(str(meta_path.parent.name))
                continue
            self.jobs[job.id] = job
            _log.info(
                "recovered assembly job %s: %d of %d subjects ready",
                job.id,
                sum(s.state == apb.SUBJECT_STATE_READY for s in job.subjects.values()),
                len(job.subjects),
            )

    def create(self, request: apb.CreateJobRequest, identity: Identity = ANONYMOUS) -> Job:
        """Creates the job ``request`` describes, owned by ``identity``, within the job limits; the same request
        again returns the job (to its owner or an administrator: a job id another identity holds is
        PERMISSION_DENIED, whatever the parameters, so that neither the job nor its parameters are revealed)."""
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
        spec = apb.CreateJobRequest(spec=request.spec).spec
        spec.ClearField("extractor")
        spec.ClearField("transform")
        job_id = request.job_id or uuid.uuid4().hex[:12]
        if not _JOB_ID.match(job_id):
            raise InvalidArgument(
                f"job_id: {bounded(job_id)} may use only letters, digits, '-', '_' and '.', must begin with a letter "
                "or digit and have at most 128 characters"
            )
        mode = overlap_mode_name(request.overlap_mode)
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                if not identity.owns(existing.owner):
                    raise PermissionDenied(f"job_id: {bounded(job_id)} is taken: choose another id")
                if (
                    existing.spec.SerializeToString(deterministic=True) == spec.SerializeToString(deterministic=True)
                    and existing.entries == entries
                    and existing.mode == mode
                ):
                    return existing
                raise FailedPrecondition(f"job_id: job {job_id!r} already exists with other parameters")
            self._admit(identity)
            source = self.resolve(spec)
            if source.length == 0:
                raise InvalidArgument(f"spec: the datasource on {spec.dataset!r} has no samples: nothing to assemble")
            try:
                directory = confined(self.state_dir / "jobs", job_id)
            except ValueError:
                raise InvalidArgument(f"job_id: {bounded(job_id)} does not name a folder of its own") from None
            for sub in ("journals", "buffers", "results"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
            job = Job(
                job_id,
                directory,
                spec,
                source,
                entries,
                mode,
                self.pool,
                int(time.time() * 1000),
                self.finisher,
                self.durable,
                identity.name,
            )
            job.quota = self.quota
            job.save_metadata()
            self.jobs[job_id] = job
        _log.info(
            "created assembly job %s on %r (%d subjects, %d samples, %s) for %s",
            job_id,
            spec.dataset,
            len(job.subjects),
            source.length,
            mode,
            identity.name,
        )
        return job

    def _admit(self, identity: Identity) -> None:
        """Refuses a new job beyond the job limits (under ``_lock``); without authentication (every caller
        ANONYMOUS) only the total applies."""
        lim = self.limits
        owner = identity.name
        owned = sum(1 for job in self.jobs.values() if job.owner == owner)
        if identity is not ANONYMOUS and owned >= lim.max_jobs_per_identity:
            raise exhausted(
                f"jobs: {bounded(owner)} already holds {owned} assembly jobs (delete finished ones)",
                lim.max_jobs_per_identity,
                "--max-jobs-per-identity",
            )
        if len(self.jobs) >= lim.max_jobs:
            raise exhausted(
                f"jobs: the server already holds {len(self.jobs)} assembly jobs", lim.max_jobs, "--max-jobs"
            )

    def close(self) -> None:
        """Waits for the volumes being finished; the store is not used afterwards."""
        self.finisher.shutdown(wait=True)

    def get(self, job_id: str, field: str = "job_id") -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"{field}: unknown assembly job {bounded(job_id)}") from None

    def delete(self, job_id: str) -> None:
        with self._lock:
            job = self.get(job_id)
            del self.jobs[job_id]
        job.delete_files()
        self.quota.drop(job_id)  # its folder is gone: every byte it held is given back
