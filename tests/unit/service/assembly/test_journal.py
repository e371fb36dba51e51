"""Journals: records come back as appended, a torn or corrupt tail is cut off, deleting removes the file; atomic
writes and confined paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchwire.service.assembly.journal import Journal, confined, record_bytes, write_atomic


def _arrays(k: int) -> dict[str, list[np.ndarray]]:
    return {
        "p": [np.full((2, 3, 1), k, np.float32), np.full((2, 3, 1), -k, np.float32)],
        "q": [np.arange(4, dtype=np.int16) + k, np.eye(2, dtype=np.float64)],
    }


def test_records_come_back_in_order_as_appended(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "0.journal")
    assert list(journal.records()) == []  # no file yet: no records
    for k in range(3):
        journal.append([2 * k, 2 * k + 1], _arrays(k))
    records = list(journal.records())
    assert [r.sample_indices for r in records] == [[0, 1], [2, 3], [4, 5]]
    for k, record in enumerate(records):
        for name, arrays in _arrays(k).items():
            assert all(
                np.array_equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
                for a, b in zip(record.arrays[name], arrays, strict=True)
            )


def test_record_bytes_is_what_an_append_adds(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "0.journal")
    journal.append([7, 9], _arrays(1))
    size = journal.path.stat().st_size
    journal.append([11, 12], _arrays(2))
    assert journal.path.stat().st_size - size == record_bytes([11, 12], _arrays(2))


@pytest.mark.parametrize("tail", [b"PWJ1\x10", b"garbage after the last record"], ids=["torn", "corrupt"])
def test_a_torn_tail_is_dropped_and_cut_off(tmp_path: Path, tail: bytes) -> None:
    journal = Journal(tmp_path / "0.journal")
    journal.append([0], {"p": [np.ones((2, 2), np.float32)]})
    journal.append([1], {"p": [np.zeros((2, 2), np.float32)]})
    intact = journal.path.stat().st_size
    with open(journal.path, "ab") as f:
        f.write(tail)
    assert [r.sample_indices for r in journal.records()] == [[0], [1]]
    assert journal.path.stat().st_size == intact  # cut off: a later append is not glued to it
    journal.append([2], {"p": [np.full((2, 2), 2, np.float32)]})
    assert [r.sample_indices for r in journal.records()] == [[0], [1], [2]]


def test_a_record_whose_checksum_fails_ends_the_journal(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "0.journal")
    journal.append([0], {"p": [np.ones(4, np.float32)]})
    first = journal.path.stat().st_size
    journal.append([1], {"p": [np.ones(4, np.float32)]})
    data = bytearray(journal.path.read_bytes())
    data[first + 20] ^= 0xFF  # a flipped byte inside the second record
    journal.path.write_bytes(bytes(data))
    assert [r.sample_indices for r in journal.records()] == [[0]]
    assert journal.path.stat().st_size == first


def test_delete_removes_the_file_and_may_be_repeated(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "0.journal")
    journal.append([0], {"p": [np.ones(1, np.uint8)]})
    journal.delete()
    assert not journal.path.exists() and list(journal.records()) == []
    journal.delete()


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc"])
def test_confined_refuses_names_that_leave_their_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="does not name an entry of"):
        confined(tmp_path, name)


def test_confined_refuses_a_link_out_of_its_folder(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "escape").symlink_to(tmp_path)
    assert confined(tmp_path / "jobs", "job-1") == (tmp_path / "jobs" / "job-1").resolve()
    with pytest.raises(ValueError):
        confined(tmp_path / "jobs", "escape")
