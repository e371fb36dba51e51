"""Subjects: buffers per overlap mode, whether samples cover every voxel, and buffers spilled to files and back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from patchwire.service._datasource import DatasourceCache
from patchwire.service.assembly import EntrySpec, MemoryPool
from patchwire.service.assembly.subjects import WEIGHT

from _assembly_jobs import make_job, patches, resolver, slices, write_dataset

SHAPE = (2, 1, 3)  # one subject
F32 = EntrySpec("p", 2, np.dtype(np.float32))
UINT8 = EntrySpec("p", 2, np.dtype(np.uint8))
F64 = EntrySpec("p", 1, np.dtype(np.float64))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasourceCache]:
    with resolver(write_dataset(tmp_path_factory.mktemp("subjects"), [SHAPE])) as c:
        yield c


@pytest.mark.parametrize(
    ("mode", "entry", "specs"),
    [
        ("overwrite", UINT8, {"p": ((*SHAPE, 2), np.uint8)}),  # the volume itself, in the entry's dtype
        ("average", UINT8, {"p": ((*SHAPE, 2), np.float32), WEIGHT: (SHAPE, np.float32)}),
        ("gaussian", F64, {"p": ((*SHAPE, 1), np.float64), WEIGHT: (SHAPE, np.float32)}),  # float64 sums
    ],
)
def test_buffers_per_overlap_mode(
    cache: DatasourceCache, tmp_path: Path, mode: str, entry: EntrySpec, specs: dict[str, tuple[tuple[int, ...], type]]
) -> None:
    subject = make_job(cache, slices(), tmp_path, [entry], mode=mode).subjects[0]
    assert subject.buffer_specs() == {key: (shape, np.dtype(dtype)) for key, (shape, dtype) in specs.items()}
    assert subject.buffer_bytes() == sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in specs.values())
    assert subject.result_bytes() == int(np.prod(SHAPE)) * entry.channels * entry.dtype.itemsize + 128


def test_coverage_decides_whether_overwrite_buffers_are_zeroed(cache: DatasourceCache, tmp_path: Path) -> None:
    """Slices cover every voxel: their buffers need no zeroing; 1x1x2 patches without the incomplete one leave
    x = 2 uncovered: zeroed."""
    covering = make_job(cache, slices(), tmp_path / "slices", [F32], mode="overwrite")
    gaps = make_job(cache, patches((1, 1, 2), ignore_incomplete=True), tmp_path / "patches", [F32], mode="overwrite")
    assert covering.covers(covering.subjects[0]) and not gaps.covers(gaps.subjects[0])
    covering.pool.buffers(covering.subjects[0])
    gaps.pool.buffers(gaps.subjects[0])
    assert covering.subjects[0].unzeroed and not gaps.subjects[0].unzeroed


def test_buffers_spilled_to_files_come_back_as_they_were(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(1 << 20)
    subject = make_job(cache, slices(), tmp_path, [F32], pool=pool).subjects[0]
    buffers = pool.buffers(subject)
    assert set(buffers) == {"p", WEIGHT} and not buffers["p"].any()
    values = np.arange(12, dtype=np.float32).reshape(*SHAPE, 2)
    buffers["p"][...] = values
    buffers[WEIGHT][...] = 2
    del buffers
    pool.release(subject, spill=True)
    assert subject.mapped is None and subject.memory == [] and pool.resident == 0
    assert all(subject.buffer_path(key).exists() for key in ("p", WEIGHT))
    back = pool.buffers(subject)
    np.testing.assert_array_equal(back["p"], values)
    assert (back[WEIGHT] == 2).all()
    assert not any(subject.buffer_path(key).exists() for key in ("p", WEIGHT))  # read back: removed
    assert pool.resident == subject.buffer_bytes() == pool.resident_of([subject])


def test_unmapped_without_spilling_buffers_are_gone(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(1 << 20)
    subject = make_job(cache, slices(), tmp_path, [F32], pool=pool).subjects[0]
    pool.buffers(subject)["p"][...] = 7
    subject.delete_buffers()
    assert subject.mapped is None and not subject.buffer_path("p").exists()
    assert not pool.buffers(subject)["p"].any()


def test_missing_sample_indices(cache: DatasourceCache, tmp_path: Path) -> None:
    subject = make_job(cache, patches((1, 1, 1)), tmp_path, [F32]).subjects[0]
    assert subject.expected == 6 and subject.missing(10) == [0, 1, 2, 3, 4, 5]
    subject.received[[0, 2, 3]] = True
    assert subject.missing(10) == [1, 4, 5] and subject.missing(2) == [1, 4]
