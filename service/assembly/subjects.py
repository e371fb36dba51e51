"""One subject of an assembly job: what it expects and has received, its buffers (in memory, or spilled to their
files) and the files of its finished volume; and the ``.npy`` reading and writing they use.

A subject's buffers follow the job's overlap mode: overwrite buffers are the volume in the entry's dtype; average
and Gaussian buffers are float sums per entry (float32, float64 for a float64 entry) plus one float32 weight per
voxel (``__weight__``). Buffers are derived state: the journal, not the spilled files, is what recovery reads.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchwire.service._errors import Internal
from patchwire.service.assembly.journal import Journal
from patchwire.service.assembly.memory import Memory
from patchwire.v1 import assembly_service_pb2 as apb

if TYPE_CHECKING:
    from patchwire.service.assembly.job import Job

__all__ = ["WEIGHT", "EntrySpec", "Subject", "npy_bytes", "read_npy", "read_only", "write_npy"]

WEIGHT = "__weight__"
"""The buffer of the per-voxel weight sums of an average or Gaussian job."""


@dataclass(frozen=True)
class EntrySpec:
    """One output entry of a job: every subject's volume holds ``channels`` channels of ``dtype`` under ``name``."""

    name: str
    channels: int
    dtype: np.dtype[Any]


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
    memory: list[Memory] = field(default_factory=list, init=False, repr=False)
    """The memory under the mapped buffers, in :meth:`buffer_specs` order (guarded by the pool's lock)."""
    writers: int = field(default=0, init=False)
    """Threads writing into the buffers (which are not spilled meanwhile)."""
    unzeroed: bool = field(default=False, init=False)
    """The buffers may hold an earlier buffer's bytes where no sample has been written yet."""
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
            specs[WEIGHT] = (self.shape, np.dtype(np.float32))
        return specs

    def buffer_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dt.itemsize for shape, dt in self.buffer_specs().values())

    def buffer_path(self, key: str) -> Path:
        """The file buffer ``key`` is spilled to (a kept volume's entry stays there once spilled)."""
        return self.job.directory / "buffers" / f"{self.index}.{key}.npy"

    def map(
        self, zeros: Callable[[tuple[int, ...], np.dtype[Any], bool, bool], tuple[np.ndarray, Memory]]
    ) -> dict[str, np.ndarray]:
        """The buffers in memory (from ``zeros``): zeros, or what a spill left in their files (removed once read).
        Overwrite buffers whose samples cover every voxel are not zeroed first (:meth:`Job.covers`); ``unzeroed``
        says so until a forced finish zeroes what no received sample covered."""
        out: dict[str, np.ndarray] = {}
        self.memory = []
        spilled = all(self.buffer_path(key).exists() for key in self.buffer_specs())
        if not spilled:  # (a spilled buffer comes back as it was, zeroed or not)
            self.unzeroed = self.job.mode == "overwrite" and self.job.covers(self)
        zero = not spilled and not self.unzeroed
        for key, (shape, dtype) in self.buffer_specs().items():
            out[key], memory = zeros(shape, dtype, zero, self.job.keeps_volumes)
            self.memory.append(memory)
            path = self.buffer_path(key)
            if path.exists():
                read_npy(path, out[key])
                path.unlink()
        self.mapped = out
        return out

    def unmap(self, spill: bool = True) -> list[Memory]:
        """Drops the buffers, first writing them to their files with ``spill``; returns the memory under them (freed
        once no array views it, e.g. a volume being fetched)."""
        if self.mapped is not None:
            if spill:
                for key, buffer in self.mapped.items():
                    write_npy(self.buffer_path(key), buffer, sync=False)
            self.mapped = None
        memory, self.memory = self.memory, []
        return memory

    def delete_buffers(self) -> None:
        self.job.pool.release(self, spill=False)
        for key in self.buffer_specs():
            self.buffer_path(key).unlink(missing_ok=True)

    def result_path(self, entry: str) -> Path:
        return self.job.directory / "results" / f"{self.index}.{entry}.npy"

    def forced_path(self) -> Path:
        """The file of a forced subject's received samples, written before its results."""
        return self.job.directory / "results" / f"{self.index}.forced.npy"

    def result_bytes(self) -> int:
        """Bytes of the subject's result files (an upper bound: the ``.npy`` header is taken as 128 bytes)."""
        return sum(int(np.prod(self.shape)) * e.channels * e.dtype.itemsize + 128 for e in self.job.entries)

    def room_bytes(self) -> int:
        """Disk a subject may take besides its journal: results, and buffers spilled meanwhile."""
        return self.result_bytes() + self.buffer_bytes() + 128 * len(self.buffer_specs())

    def missing(self, limit: int) -> list[int]:
        local = np.flatnonzero(~self.received[: self.expected])[:limit]
        return [int(i) + self.first_sample for i in local]


def write_npy(path: Path, array: np.ndarray, sync: bool) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def read_npy(path: Path, into: np.ndarray) -> None:
    """Reads an ``.npy`` file written by :func:`write_npy` into ``into`` (no mapping: no file pages in the RSS)."""
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


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of an ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view of ``array``."""
    view = array.view(np.ndarray)
    view.flags.writeable = False
    return view
