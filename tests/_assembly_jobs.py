"""Assembly stores and jobs without a server, on tiny HDF5 datasets written from arrays: the pieces the unit tests
of patchwire.service.assembly build on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from patchwire.service._datasource import DatasourceCache
from patchwire.service._served import ServedDataset
from patchwire.service.assembly import AssemblyStore, EntrySpec, Job, MemoryPool
from patchwire.v1 import spec_pb2

from _datasets import write_arrays_dataset

DATASET = "tiny"


def write_dataset(folder: Path, shapes: Sequence[tuple[int, int, int]]) -> Path:
    """A dataset of one subject per shape, its image holding the voxel numbers."""
    subjects = [{"images": {"T1": np.arange(np.prod(s), dtype=np.float32).reshape(s)}} for s in shapes]
    return write_arrays_dataset(folder / "tiny.h5", subjects)


def slices(axis: int = 0) -> spec_pb2.DatasourceSpec:
    spec = spec_pb2.DatasourceSpec(dataset=DATASET)
    spec.indexing_strategy.slice.slice_axis.append(axis)
    return spec


def patches(
    shape: Sequence[int], stride: Sequence[int] = (), ignore_incomplete: bool = False
) -> spec_pb2.DatasourceSpec:
    spec = spec_pb2.DatasourceSpec(dataset=DATASET)
    spec.indexing_strategy.patch_wise.patch_shape.extend(shape)
    spec.indexing_strategy.patch_wise.stride.extend(stride)
    spec.indexing_strategy.patch_wise.ignore_incomplete = ignore_incomplete
    return spec


@contextmanager
def resolver(h5: Path) -> Iterator[DatasourceCache]:
    """Resolves specs on dataset ``tiny`` (the file ``h5``) as a server does."""
    served = ServedDataset(DATASET, h5)
    try:
        yield DatasourceCache({DATASET: served})
    finally:
        served.close()


def make_job(
    cache: DatasourceCache,
    spec: spec_pb2.DatasourceSpec,
    folder: Path,
    entries: Sequence[EntrySpec],
    mode: str = "average",
    pool: MemoryPool | None = None,
    durable: bool = True,
) -> Job:
    """A job in ``folder`` that finishes subjects in the posting thread (no finisher)."""
    for sub in ("journals", "buffers", "results"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    pool = pool if pool is not None else MemoryPool(1 << 30)
    return Job("job", folder, spec, cache.get(spec), list(entries), mode, pool, 0, durable=durable)


def make_store(state: Path, cache: DatasourceCache, budget: int = 1 << 30) -> AssemblyStore:
    return AssemblyStore(state, cache.get, budget)
