"""The cache of samples kept compressed: which datasources and requests use it, what it keeps (the frames a fresh
compression makes, small arrays as read-only copies), its hits, its byte bound, its keys (spec, codec, file
version), and a file that changes on disk dropping its entries. Real HDF5 files, no server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from patchwire.client import augmentation as aug
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.service._cache import BlockCache
from patchwire.service._catalog import Dataset
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._packed_samples import ENTRY_OVERHEAD, PackedSamples
from patchwire.service._randomness import Draw
from patchwire.service._served import ServedDataset
from patchwire.v1 import spec_pb2
from patchwire.wire import compression
from patchwire.wire.compression import Compression, Packed, Policy

from _datasets import write_arrays_dataset

SHAPE = (6, 96, 80)  # an axial slice of two float32 images: 61 KB (packed); of uint8 labels: 7.7 KB (kept raw)
LZ4 = Policy(Compression.COMPRESSION_SHUFFLE_LZ4, Compression.COMPRESSION_SHUFFLE_LZ4)
ZSTD = Policy(Compression.COMPRESSION_SHUFFLE_ZSTD, Compression.COMPRESSION_SHUFFLE_ZSTD)


def _subjects(seed: int) -> list[dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        image = np.zeros(SHAPE, np.float32)
        image[:, 20:70, 15:60] = rng.normal(300, 40, (SHAPE[0], 50, 45))
        labels = (image > 300).astype(np.uint8)
        out.append({"images": {"T1": image, "T2": image * 2}, "labels": {"GT": labels}})
    return out


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return write_arrays_dataset(tmp_path / "d.h5", _subjects(1))


@pytest.fixture
def dataset(h5: Path) -> Iterator[Dataset]:
    ds = Dataset("d", h5, BlockCache(64 << 20))
    try:
        yield ds
    finally:
        ds.close()


def _source(dataset: Dataset, transform: Any = None, strategy: Any = None) -> CompiledDatasource:
    spec = spec_pb2.DatasourceSpec(
        dataset="d",
        indexing_strategy=(strategy or extr.SliceIndexing())._to_proto(),
        extractor=extr.ComposeExtractor(
            [extr.DataExtractor(("images", "labels")), extr.SubjectExtractor()]
        )._to_proto(),
    )
    if transform is not None:
        spec.transform.CopyFrom(transform._to_proto())
    return CompiledDatasource(dataset, spec)


def _fetch(cache: PackedSamples, src: CompiledDatasource, indices: list[int], policy: Policy = LZ4) -> list[Any]:
    """What a message of ``indices`` gets from the cache (as the servicer asks: sample by sample, then finish)."""
    packing = cache.begin(src, policy)
    assert packing is not None
    return packing.finish([packing.sample(i, Draw.of_index(i if i >= 0 else i + src.length)) for i in indices])


def test_a_sample_is_kept_as_its_frames_and_sent_again_unchanged(dataset: Dataset) -> None:
    src = _source(dataset)
    cache = PackedSamples(16 << 20)
    (first,) = _fetch(cache, src, [7])
    raw = src.sample(7)
    images = first["images"]
    assert isinstance(images, Packed) and (images.shape, images.dtype) == (raw["images"].shape, np.dtype("<f4"))
    assert np.array_equal(images.array(), raw["images"]) and images.packed_nbytes * 3 < raw["images"].nbytes
    fresh = compression.pack(raw["images"], LZ4)
    assert fresh is not None and fresh.frames == images.frames  # what compressing it now would send
    # labels under MIN_FRAME_BYTES are kept raw, as a read-only copy of their own (not a view of the block cache)
    labels = first["labels"]
    assert isinstance(labels, np.ndarray) and np.array_equal(labels, raw["labels"])
    assert not labels.flags.writeable and labels.base is None
    assert first["subject"] == raw["subject"]
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    (again,) = _fetch(cache, src, [7 - src.length])  # the same sample by its negative index
    assert again is first and (cache.hits, cache.misses) == (1, 1)
    others = len(first) - 2  # values that are not arrays (the subject's name, its index): 64 bytes each
    assert cache.nbytes == ENTRY_OVERHEAD + images.packed_nbytes + labels.nbytes + 64 * others


def test_a_message_of_hits_and_misses_comes_back_in_order(dataset: Dataset) -> None:
    src = _source(dataset)
    cache = PackedSamples(16 << 20)
    _fetch(cache, src, [1, 3])
    with ThreadPoolExecutor(2) as threads:  # misses packed on threads, as the server's sample threads do
        samples = _fetch(cache, src, [0, 1, 2, 3, 4], Policy(LZ4.integer, LZ4.other, threads=threads))
    for i, sample in zip([0, 1, 2, 3, 4], samples, strict=True):
        assert np.array_equal(sample["images"].array(), src.sample(i)["images"]), i
    assert (cache.hits, cache.misses, len(cache)) == (2, 5, 5)


def test_each_spec_and_codec_has_entries_of_its_own(dataset: Dataset) -> None:
    cache = PackedSamples(16 << 20)
    axial, sagittal = _source(dataset), _source(dataset, strategy=extr.SliceIndexing(2))
    a, b, c = _fetch(cache, axial, [0])[0], _fetch(cache, sagittal, [0])[0], _fetch(cache, axial, [0], ZSTD)[0]
    assert a["images"].shape != b["images"].shape and c["images"].codec == ZSTD.other
    assert np.array_equal(a["images"].array(), c["images"].array())
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)


@pytest.mark.parametrize(
    ("why", "capacity", "policy", "transform", "strategy"),
    [
        ("no codec asked for", 16 << 20, Policy(), None, None),
        ("a codec without frames", 16 << 20, Policy(Compression.COMPRESSION_LZ4), None, None),
        ("the cache is off", 0, LZ4, None, None),
        ("random transforms", 16 << 20, LZ4, aug.RandomFlip(axes=(1,)), None),
        ("random patches", 16 << 20, LZ4, None, extr.UniformSampler((2, 16, 16))),
    ],
)
def test_what_is_not_kept(
    dataset: Dataset, why: str, capacity: int, policy: Policy, transform: Any, strategy: Any
) -> None:
    src = _source(dataset, transform, strategy)
    assert PackedSamples(capacity).begin(src, policy) is None, why


def test_a_deterministic_transform_is_kept(dataset: Dataset) -> None:
    src = _source(dataset, tfm.Permute((2, 0, 1), entries=("images",)))
    assert src.deterministic and PackedSamples(16 << 20).begin(src, LZ4) is not None


def test_the_least_recently_used_go_beyond_the_capacity(dataset: Dataset) -> None:
    src = _source(dataset)
    probe = PackedSamples(16 << 20)
    _fetch(probe, src, [0])
    capacity = 3 * probe.nbytes + probe.nbytes // 2  # room for three samples of about that size
    cache = PackedSamples(capacity)
    _fetch(cache, src, [0, 1, 2])
    _fetch(cache, src, [0])  # 0 used again: 1 is now the least recently used
    _fetch(cache, src, [3, 4])
    assert len(cache) == 3 and cache.nbytes <= capacity
    hits = cache.hits
    _fetch(cache, src, [0])
    assert cache.hits == hits + 1  # kept
    _fetch(cache, src, [1])
    assert cache.hits == hits + 1  # evicted, built again
    tiny = PackedSamples(ENTRY_OVERHEAD)  # a sample larger than the whole cache is sent, not kept
    (sample,) = _fetch(tiny, src, [0])
    assert isinstance(sample["images"], Packed) and len(tiny) == 0 and tiny.nbytes == 0


def test_a_file_changed_on_disk_drops_its_entries(h5: Path) -> None:
    served = ServedDataset("d", h5, BlockCache(64 << 20))
    try:
        cache = PackedSamples(16 << 20, {"d": served})
        old = served.current()
        src = _source(old)
        _fetch(cache, src, [0, 1])
        assert len(cache) == 2
        write_arrays_dataset(h5, _subjects(2))  # other intensities, same layout
        stat = h5.stat()
        os.utime(h5, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        served.refresh()
        assert len(cache) == 0 and cache.nbytes == 0
        new = served.current()
        assert new.generation != old.generation
        (sample,) = _fetch(cache, _source(new), [0])
        assert cache.hits == 0
        assert np.array_equal(sample["images"].array(), _source(new).sample(0)["images"])
    finally:
        served.close()
