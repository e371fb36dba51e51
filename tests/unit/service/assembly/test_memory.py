"""The memory pool: buffers within the budget (the least recently used spilled to files and read back), memory of
dropped buffers kept for later ones, and memory lent to clients held until its leases come back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from patchwire.service._datasource import DatasourceCache
from patchwire.service.assembly import EntrySpec, Job, MemoryPool
from patchwire.service.assembly import memory as memory_module
from patchwire.service.assembly.subjects import WEIGHT

from _assembly_jobs import make_job, resolver, slices, write_dataset

SHAPE = (2, 1, 3)
ENTRY = EntrySpec("p", 1, np.dtype(np.float32))
SUBJECT_BYTES = 2 * int(np.prod(SHAPE)) * 4  # average: sums and weights, float32
VOLUME_BYTES = int(np.prod(SHAPE)) * 4  # overwrite: the volume alone


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasourceCache]:
    with resolver(write_dataset(tmp_path_factory.mktemp("memory"), [SHAPE] * 3)) as c:
        yield c


def _job(cache: DatasourceCache, folder: Path, pool: MemoryPool, mode: str = "average", durable: bool = True) -> Job:
    return make_job(cache, slices(), folder, [ENTRY], mode=mode, pool=pool, durable=durable)


def test_the_least_recently_used_buffers_are_spilled_beyond_the_budget(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(2 * SUBJECT_BYTES)
    job = _job(cache, tmp_path, pool)
    s0, s1, s2 = (job.subjects[s] for s in range(3))
    pool.buffers(s0)["p"][...] = 5
    pool.buffers(s1)
    assert pool.resident == 2 * SUBJECT_BYTES and s0.mapped is not None
    pool.buffers(s2)
    assert pool.resident == 2 * SUBJECT_BYTES and s0.mapped is None  # subject 0 was the least recently used
    assert s0.buffer_path("p").exists() and s0.buffer_path(WEIGHT).exists()
    assert (pool.buffers(s0)["p"] == 5).all()  # read back; subject 1 spilled in turn
    assert s1.mapped is None and s2.mapped is not None
    assert pool.resident == 2 * SUBJECT_BYTES == job.resident_bytes()


def test_a_subject_larger_than_the_budget_is_held_alone(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(SUBJECT_BYTES // 2)
    job = _job(cache, tmp_path, pool)
    pool.buffers(job.subjects[0])
    pool.buffers(job.subjects[1])
    assert pool.resident == SUBJECT_BYTES and job.subjects[0].mapped is None


def test_buffers_being_written_are_not_spilled(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(SUBJECT_BYTES)
    job = _job(cache, tmp_path, pool)
    with pool.writing(job.subjects[0]) as buffers:
        pool.buffers(job.subjects[1])  # over the budget: subject 0 stays while it is written
        buffers["p"][...] = 3
        assert job.subjects[0].mapped is not None and pool.resident == 2 * SUBJECT_BYTES
    pool.buffers(job.subjects[2])
    assert job.subjects[0].mapped is None and pool.resident == SUBJECT_BYTES


def test_memory_of_dropped_buffers_is_reused_zeroed(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(1 << 20)
    job = _job(cache, tmp_path, pool)
    pool.buffers(job.subjects[0])["p"][...] = 9
    pool.release(job.subjects[0], spill=False)
    assert pool.spare_bytes == SUBJECT_BYTES and pool.resident == 0
    reused = pool.buffers(job.subjects[1])
    assert pool.spare_bytes == 0 and not reused["p"].any()  # the kept memory, zeroed


def test_memory_an_array_still_views_is_not_kept(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(1 << 20)
    job = _job(cache, tmp_path, pool)
    view = pool.buffers(job.subjects[0])["p"]
    pool.release(job.subjects[0], spill=False)
    assert pool.spare_bytes == int(np.prod(SHAPE)) * 4  # the weights' memory only: the sums are still viewed
    view[...] = 1  # (still valid: freed with the last view)


def test_spare_memory_stays_within_the_budget(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(SUBJECT_BYTES)
    job = _job(cache, tmp_path, pool)
    pool.buffers(job.subjects[0])
    pool.release(job.subjects[0], spill=False)
    assert pool.spare_bytes == SUBJECT_BYTES
    pool.buffers(job.subjects[1])
    assert pool.resident + pool.spare_bytes + pool.held_bytes <= SUBJECT_BYTES


@pytest.fixture
def lending(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept volumes of any size live in memfds (the default is 4 MiB and up)."""
    monkeypatch.setattr(memory_module, "SHARED_VOLUME_MIN_BYTES", 0)


def _lend(pool: MemoryPool, job: Job, subject: int) -> bytes:
    pool.buffers(job.subjects[subject])
    with pool.lock:
        return pool.lend(job.subjects[subject].memory[0])


@pytest.mark.usefixtures("lending")
def test_leased_memory_is_held_until_its_lease_comes_back(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(1 << 20, share=True)
    job = _job(cache, tmp_path, pool, mode="overwrite", durable=False)
    assert job.keeps_volumes
    token = _lend(pool, job, 0)
    assert job.subjects[0].memory[0].fd is not None and pool.memfds == 1
    assert pool.leases == {token}
    pool.release(job.subjects[0], spill=False)
    assert (pool.held_bytes, pool.spare_bytes) == (VOLUME_BYTES, 0)  # never reused while a client maps it
    pool.buffers(job.subjects[1])
    assert pool.memfds == 2 and pool.held_bytes == VOLUME_BYTES  # a memfd of its own: the held one is not reused
    assert pool.give_back([token, b"unknown"]) == 1
    assert (pool.held_bytes, pool.spare_bytes, pool.spare_shared_bytes) == (0, VOLUME_BYTES, VOLUME_BYTES)
    assert pool.leases == frozenset() and pool.give_back([token]) == 0


@pytest.mark.usefixtures("lending")
def test_leased_memory_is_given_up_when_the_budget_needs_the_room(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(VOLUME_BYTES, share=True)
    job = _job(cache, tmp_path, pool, mode="overwrite", durable=False)
    token = _lend(pool, job, 0)
    pool.release(job.subjects[0], spill=False)
    assert pool.held_bytes == VOLUME_BYTES
    pool.buffers(job.subjects[1])
    assert pool.held_bytes == 0 and pool.leases == frozenset()  # its pages live on in the client's mapping alone
    assert pool.give_back([token]) == 0


@pytest.mark.usefixtures("lending")
def test_beyond_the_memfd_ceiling_volumes_are_anonymous(cache: DatasourceCache, tmp_path: Path) -> None:
    pool = MemoryPool(1 << 20, share=True)
    pool.memfds_max = 1
    job = _job(cache, tmp_path, pool, mode="overwrite", durable=False)
    pool.buffers(job.subjects[0])
    pool.buffers(job.subjects[1])
    assert [job.subjects[s].memory[0].fd is not None for s in (0, 1)] == [True, False]
    assert pool.memfds == 1
