"""Append-only journals of acknowledged predictions: the durable truth from which partial volumes are rebuilt.

A record is ``MAGIC | u32 header length | header (JSON) | payload | u32 CRC32`` where the CRC covers everything
before it. The header lists the sample indices and, per output entry, each sample's array shape and dtype; the
payload holds the arrays back to back. :meth:`Journal.append` writes a record and fsyncs before returning, so a
prediction is acknowledged only once it is on disk. Reading stops at the first torn or corrupt record (a crash
during a write that was never acknowledged) and truncates the file there.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["Journal", "JournalRecord", "confined", "fsync_path", "record_bytes", "write_atomic"]

_log = logging.getLogger(__name__)
MAGIC = b"PWJ1"
_U32 = struct.Struct("<I")
_IOV_MAX = 1024  # Linux's limit on buffers per writev call


@dataclass
class JournalRecord:
    sample_indices: list[int]
    arrays: dict[str, list[np.ndarray]]
    """Per output entry, one array per sample (in sample order)."""


def confined(root: Path, name: str) -> Path:
    """``root / name``, checked to be a direct child of ``root`` once both are resolved (symbolic links, ``..``):
    a name that would reach anything else raises ValueError before anything is written or removed."""
    base = root.resolve()
    path = (base / name).resolve()
    if path.parent != base or name in ("", ".", ".."):
        raise ValueError(f"{name!r} does not name an entry of {root}")
    return path


def fsync_path(path: Path) -> None:
    """fsyncs a file, or a folder (which makes a rename or a new file in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` durably: temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _head(record: JournalRecord) -> bytes:
    header: dict[str, Any] = {"indices": record.sample_indices, "entries": {}}
    for name, arrays in record.arrays.items():
        header["entries"][name] = [[list(a.shape), a.dtype.str] for a in arrays]
    return json.dumps(header, separators=(",", ":")).encode()


def record_bytes(sample_indices: Sequence[int], arrays: Mapping[str, Sequence[np.ndarray]]) -> int:
    """How many bytes :meth:`Journal.append` would add for this record (accounted before it is written)."""
    record = JournalRecord([int(i) for i in sample_indices], {k: list(v) for k, v in arrays.items()})
    payload = sum(a.nbytes for values in record.arrays.values() for a in values)
    return len(MAGIC) + _U32.size + len(_head(record)) + payload + _U32.size


def _encode(record: JournalRecord) -> list[bytes | memoryview]:
    """A record as the buffers to write back to back: the arrays' own memory, never joined into one copy (the
    journal is on the path of every acknowledged prediction)."""
    parts: list[bytes | memoryview] = []
    for arrays in record.arrays.values():
        parts.extend(np.ascontiguousarray(a).reshape(-1).data.cast("B") for a in arrays)
    head = _head(record)
    start = b"".join([MAGIC, _U32.pack(len(head)), head])
    crc = zlib.crc32(start)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [start, *parts, _U32.pack(crc)]


def _write_all(fd: int, buffers: Sequence[bytes | memoryview]) -> None:
    """``os.writev`` until every byte is written (at most IOV_MAX buffers a call; a short write continues)."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        if written <= 0:
            raise OSError(f"writev wrote {written} bytes")
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0] = pending[0][written:]
                written = 0


def _read_one(f: BinaryIO) -> JournalRecord | None:
    start = f.read(8)
    if len(start) < 8 or start[:4] != MAGIC:
        return None
    (head_len,) = _U32.unpack(start[4:])
    head = f.read(head_len)
    if len(head) < head_len:
        return None
    try:
        header = json.loads(head)
        specs = {
            name: [(tuple(shape), np.dtype(dt)) for shape, dt in items] for name, items in header["entries"].items()
        }
    except (ValueError, KeyError, TypeError):
        return None
    size = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for items in specs.values() for shape, dt in items)
    payload = f.read(size)
    crc = f.read(4)
    if len(payload) < size or len(crc) < 4:
        return None
    if _U32.unpack(crc)[0] != zlib.crc32(start + head + payload):
        return None
    arrays: dict[str, list[np.ndarray]] = {}
    offset = 0
    for name, items in specs.items():
        arrays[name] = []
        for shape, dt in items:
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            arrays[name].append(np.frombuffer(payload, dtype=dt, count=n // dt.itemsize, offset=offset).reshape(shape))
            offset += n
    return JournalRecord([int(i) for i in header["indices"]], arrays)


class Journal:
    """One append-only file. Not thread-safe: the owner serialises access."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> Iterator[JournalRecord]:
        """Every intact record, in order; a torn tail is cut off."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            while True:
                pos = f.tell()
                record = _read_one(f)
                if record is None:
                    break
                yield record
            end = f.seek(0, os.SEEK_END)
        if pos < end:
            _log.warning(
                "journal %s: dropping %d bytes of a torn or corrupt record at offset %d", self.path, end - pos, pos
            )
            with open(self.path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())

    def append(self, sample_indices: Sequence[int], arrays: Mapping[str, Sequence[np.ndarray]]) -> None:
        """Appends one record and fsyncs it (and, for a new file, its folder)."""
        new = not self.path.exists()
        buffers = _encode(JournalRecord(list(sample_indices), {k: list(v) for k, v in arrays.items()}))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, buffers)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_path(self.path.parent)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
