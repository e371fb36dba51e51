"""Patch sampling on the server (no server): where the samplers put patch centres, over thousands of draws on
synthetic maps whose label counts and weights are known; how patches at the borders are padded, against ``np.pad``
of the whole volume read with h5py; determinism by (seed, epoch, index); the subject index cache; and the spec
checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from patchwire.client import extraction as extr
from patchwire.service._cache import BlockCache
from patchwire.service._catalog import Dataset
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._errors import InvalidArgument, NotFound, ResourceExhausted
from patchwire.service._randomness import Draw
from patchwire.service._sampling import MAX_PATCH_SIZE, IndexCache, PatchSampler
from patchwire.v1 import spec_pb2
from patchwire.wire import definition as defs

from _datasets import write_arrays_dataset

SHAPE = (24, 30, 36)
DRAWS = 10_000
TOLERANCE = 0.02  # absolute, on frequencies from DRAWS draws (about four standard deviations at p = 0.5)


def _subject(with_rare_labels: bool) -> dict[str, dict[str, np.ndarray]]:
    voxels = int(np.prod(SHAPE))
    t1 = (np.arange(voxels, dtype=np.float32) + 1).reshape(SHAPE)  # every voxel its own value, none zero
    gt = np.zeros(SHAPE, dtype=np.uint8)
    gt[4:16, 5:20, 6:30] = 1
    alt = np.zeros(SHAPE, dtype=np.uint8)
    alt[0:2, 0:3, 0:4] = 7
    weights = np.zeros(SHAPE, dtype=np.float32)
    if with_rare_labels:
        gt[18:21, 2:6, 3:8] = 2
        gt[22, 25:29, 30:35] = 3
        weights[1:3, 1:4, 1:5] = 1.0  # 24 voxels of weight 1
        weights[10:12, 20:22, 20:23] = 3.0  # 12 voxels of weight 3
        weights[20, 0:30, 35] = 0.5  # 30 voxels of weight 0.5
    return {
        "images": {"T1": t1, "T2": -t1},
        "labels": {"GT": gt, "ALT": alt},
        "weights": {"W": weights},
        "small": {"S": np.zeros((5, 5, 5), dtype=np.uint8)},
    }


@pytest.fixture(scope="module")
def h5_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """S0 holds labels 0-3 and a weight map of three regions; S1 labels 0 and 1 only and a weight map of zeros."""
    return write_arrays_dataset(tmp_path_factory.mktemp("sampling") / "s.h5", [_subject(True), _subject(False)])


@pytest.fixture(scope="module")
def dataset(h5_path: Path) -> Iterator[Dataset]:
    ds = Dataset("s", h5_path, BlockCache(64 << 20))
    try:
        yield ds
    finally:
        ds.close()


def _full(path: Path, category: str, subject: int) -> np.ndarray:
    """A subject's whole array, read with h5py alone."""
    with h5py.File(path, "r") as f:
        return f[f"{defs.LOC_DATA_PLACEHOLDER.format(category)}/{defs.subject_index_to_str(subject, 2)}"][()]


def _source(
    dataset: Dataset,
    strategy: extr.IndexingStrategy,
    extractor: extr.Extractor | None = None,
    max_sample_bytes: int | None = 1 << 30,
) -> CompiledDatasource:
    spec = spec_pb2.DatasourceSpec(dataset="s", indexing_strategy=strategy._to_proto())
    spec.extractor.CopyFrom(
        (
            extractor or extr.ComposeExtractor([extr.DataExtractor(("images", "labels")), extr.IndexingExtractor()])
        )._to_proto()
    )
    return CompiledDatasource(dataset, spec, max_sample_bytes)


def _sampler(dataset: Dataset, strategy: extr.IndexingStrategy) -> PatchSampler:
    sampler = _source(dataset, strategy).sampler
    assert sampler is not None
    return sampler


def _centres(sampler: PatchSampler, subject: int, draws: int = DRAWS, seed: int = 11) -> np.ndarray:
    return np.array([sampler.centre(subject, Draw(seed, 0, i, i)) for i in range(draws)])


def _frequencies(values: np.ndarray, keys: list[int]) -> dict[int, float]:
    return {k: float(np.mean(values == k)) for k in keys}


# -- where centres fall ------------------------------------------------------------------------------------------


def test_label_sampler_meets_the_probabilities(dataset: Dataset, h5_path: Path) -> None:
    gt = _full(h5_path, "labels", 0)[..., 0]
    sampler = _sampler(dataset, extr.LabelSampler((5, 5, 5), {0: 0.2, 1: 0.3, 2: 0.5}))
    centres = _centres(sampler, 0)
    got = _frequencies(gt[tuple(centres.T)], [0, 1, 2, 3])
    for label, want in {0: 0.2, 1: 0.3, 2: 0.5, 3: 0.0}.items():
        assert abs(got[label] - want) <= TOLERANCE, (label, got)


def test_label_probabilities_are_renormalised_over_the_labels_a_subject_holds(dataset: Dataset, h5_path: Path) -> None:
    gt = _full(h5_path, "labels", 1)[..., 0]
    sampler = _sampler(dataset, extr.LabelSampler((5, 5, 5), {0: 0.2, 1: 0.3, 2: 0.5}))
    got = _frequencies(gt[tuple(_centres(sampler, 1).T)], [0, 1])
    assert abs(got[0] - 0.4) <= TOLERANCE and abs(got[1] - 0.6) <= TOLERANCE, got


def test_without_probabilities_every_label_a_subject_holds_is_alike(dataset: Dataset, h5_path: Path) -> None:
    gt = _full(h5_path, "labels", 0)[..., 0]
    got = _frequencies(gt[tuple(_centres(_sampler(dataset, extr.LabelSampler(4)), 0).T)], [0, 1, 2, 3])
    assert all(abs(f - 0.25) <= TOLERANCE for f in got.values()), got


def test_a_labels_centres_are_uniform_among_its_voxels(dataset: Dataset) -> None:
    """Label 1 fills the block [4:16, 5:20, 6:30]: every slice, row and column of it alike."""
    centres = _centres(_sampler(dataset, extr.LabelSampler(3, {1: 1.0})), 0)
    for axis, (low, high) in enumerate([(4, 16), (5, 20), (6, 30)]):
        assert centres[:, axis].min() == low and centres[:, axis].max() == high - 1
        counts = np.bincount(centres[:, axis] - low, minlength=high - low)
        expected = DRAWS / (high - low)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 3 * (high - low), (axis, chi2)  # df = cells - 1: far beyond the mean only when not uniform


def test_label_entry_selects_the_map(dataset: Dataset) -> None:
    """ALT holds 7 in [0:2, 0:3, 0:4] only."""
    centres = _centres(_sampler(dataset, extr.LabelSampler(3, {7: 1.0}, label_entry="ALT")), 0, 500)
    assert (centres.max(axis=0) < [2, 3, 4]).all()


def test_positive_negative_ratio(dataset: Dataset, h5_path: Path) -> None:
    gt = _full(h5_path, "labels", 0)[..., 0]
    centres = _centres(_sampler(dataset, extr.PositiveNegativeSampler(5, positive=3.0, negative=1.0)), 0)
    positive = float(np.mean(gt[tuple(centres.T)] > 0))
    assert abs(positive - 0.75) <= TOLERANCE, positive
    only_positive = _centres(_sampler(dataset, extr.PositiveNegativeSampler(5, negative=0.0)), 0, 500)
    assert (gt[tuple(only_positive.T)] > 0).all()


def test_weighted_sampler_is_proportional_to_the_map(dataset: Dataset, h5_path: Path) -> None:
    weights = _full(h5_path, "weights", 0)[..., 0]
    centres = _centres(_sampler(dataset, extr.WeightedSampler(5, "weights")), 0)
    chosen = weights[tuple(centres.T)]
    assert (chosen > 0).all()
    # regions: 24 voxels of 1, 12 of 3, 30 of 0.5 -> weights 24, 36, 15 of 75
    observed = np.array([np.sum(chosen == 1.0), np.sum(chosen == 3.0), np.sum(chosen == 0.5)])
    expected = DRAWS * np.array([24, 36, 15]) / 75
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (observed, expected)  # df = 2, p = 0.001
    # within a region every voxel alike: the 12 voxels of weight 3
    heavy = centres[chosen == 3.0]
    flat = np.ravel_multi_index(tuple(heavy.T), SHAPE)
    counts = np.unique(flat, return_counts=True)[1]
    assert len(counts) == 12
    expected_each = len(heavy) / 12
    assert float(((counts - expected_each) ** 2 / expected_each).sum()) < 32.9  # df = 11, p = 0.0005


def test_a_subject_with_nothing_to_choose_is_sampled_uniformly(dataset: Dataset) -> None:
    """S1 holds no label 2 and its weight map is zero: centres cover the volume evenly."""
    for strategy in (extr.LabelSampler(3, {2: 1.0}), extr.WeightedSampler(3, "weights")):
        centres = _centres(_sampler(dataset, strategy), 1, 4000)
        for axis, size in enumerate(SHAPE):
            counts = np.bincount(centres[:, axis], minlength=size)
            expected = len(centres) / size
            assert float(((counts - expected) ** 2 / expected).sum()) < 3 * size, (strategy, axis)


def test_uniform_sampler_covers_the_volume(dataset: Dataset) -> None:
    centres = _centres(_sampler(dataset, extr.UniformSampler(3)), 0, 4000)
    assert (centres.min(axis=0) == 0).all() and (centres.max(axis=0) == np.array(SHAPE) - 1).all()


# -- patches -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [(9, 12, 7), (30, 8, 40), (1, 1, 1)])
def test_patches_are_windows_of_the_zero_padded_volume(dataset: Dataset, h5_path: Path, patch: tuple[int, ...]) -> None:
    """Every patch equals ``np.pad(volume)[window]``, with the window the sample's index expression reports;
    (30, 8, 40) is larger than the volume along two axes, so those are padded on both sides."""
    src = _source(dataset, extr.UniformSampler(patch, samples_per_volume=40))
    assert src.length == 80 and src.counts == [40, 40]
    padded = {
        s: {c: np.pad(_full(h5_path, c, s), [(p, p) for p in patch] + [(0, 0)]) for c in ("images", "labels")}
        for s in (0, 1)
    }
    borders = 0
    for i in range(src.length):
        sample = src.sample(i, Draw(3, 1, i, i))
        s = sample[defs.KEY_SUBJECT_INDEX]
        assert s == i // 40
        window = sample[defs.KEY_INDEX_EXPR].expression
        assert [w.stop - w.start for w in window] == list(patch)
        borders += any(w.start < 0 or w.stop > d for w, d in zip(window, SHAPE, strict=True))
        shifted = tuple(slice(w.start + p, w.stop + p) for w, p in zip(window, patch, strict=True))
        for category in ("images", "labels"):
            assert sample[category].shape == (*patch, 2)
            np.testing.assert_array_equal(sample[category], padded[s][category][shifted])
    assert borders > 10 if max(patch) > 1 else borders == 0  # the borders were exercised


def test_a_pad_extractor_extends_a_sampled_window(dataset: Dataset, h5_path: Path) -> None:
    extractor = extr.ComposeExtractor(
        [extr.PadDataExtractor((2, 1, 3), extr.DataExtractor(("images",))), extr.IndexingExtractor()]
    )
    src = _source(dataset, extr.UniformSampler((6, 6, 6), samples_per_volume=20), extractor)
    full = np.pad(_full(h5_path, "images", 0), [(10, 10)] * 3 + [(0, 0)])
    for i in range(20):
        sample = src.sample(i, Draw(0, 0, i, i))
        window = sample[defs.KEY_INDEX_EXPR].expression
        grown = tuple(slice(w.start - pad + 10, w.stop + pad + 10) for w, pad in zip(window, (2, 1, 3), strict=True))
        np.testing.assert_array_equal(sample["images"], full[grown])


def test_samples_are_a_function_of_seed_epoch_and_index(dataset: Dataset) -> None:
    src = _source(dataset, extr.LabelSampler((7, 7, 7), samples_per_volume=50))

    def windows(seed: int, epoch: int, position_offset: int = 0) -> list[Any]:
        return [
            src.sample(i, Draw(seed, epoch, i + position_offset, i))[defs.KEY_INDEX_EXPR].expression
            for i in range(src.length)
        ]

    first = windows(5, 0)
    assert first == windows(5, 0)
    assert first == windows(5, 0, position_offset=17)  # the place is the index's, not the position's
    again = src.sample(33, Draw(5, 0, 33, 33))
    same = src.sample(33, Draw(5, 0, 33, 33))
    assert all(np.array_equal(again[c], same[c]) for c in ("images", "labels"))
    for other in (windows(5, 1), windows(6, 0)):
        assert sum(a != b for a, b in zip(first, other, strict=True)) > 0.9 * len(first)
    assert len(set(map(str, first[:50]))) > 40  # a subject's patches differ among themselves


# -- the subject index -------------------------------------------------------------------------------------------


def test_the_index_is_built_once_and_is_small(dataset: Dataset) -> None:
    cache = IndexCache(1 << 20)
    sampler = _sampler(dataset, extr.LabelSampler(3))
    sampler.cache = cache
    barrier = threading.Barrier(4)

    def draw(k: int) -> None:
        barrier.wait()
        for i in range(50):
            sampler.centre(0, Draw(k, 0, i, i))

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.builds == 1 and len(cache) == 1
    assert cache.nbytes < 4 * SHAPE[0] * 8 + 200  # counts per slice and label, not voxel positions


def test_the_index_cache_is_bounded_and_keyed_by_dataset_version(dataset: Dataset, h5_path: Path) -> None:
    label = _sampler(dataset, extr.LabelSampler(3))
    one = label.cache.get  # the default cache works as well
    assert callable(one)
    cache = IndexCache(700)  # room for about one index
    label.cache = cache
    weighted = _sampler(dataset, extr.WeightedSampler(3, "weights"))
    weighted.cache = cache
    label.centre(0, Draw(0, 0, 0, 0))
    weighted.centre(0, Draw(0, 0, 0, 0))
    label.centre(0, Draw(0, 0, 1, 1))
    assert cache.builds == 3 and cache.nbytes <= 700
    other = Dataset("s", h5_path)  # another version of the same name: never served from the first's index
    try:
        again = _sampler(other, extr.LabelSampler(3))
        again.cache = cache
        again.centre(0, Draw(0, 0, 0, 0))
        assert cache.builds == 4
    finally:
        other.close()


def test_integer_labels_of_a_wide_range_and_negative_background(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[:12] = -1
    labels[2:4, 2:4, 2:4] = 1_000_000
    path = write_arrays_dataset(
        tmp_path / "wide.h5", [{"images": {"T1": np.ones(SHAPE, np.float32)}, "labels": {"GT": labels}}]
    )
    ds = Dataset("s", path)
    try:
        spec = spec_pb2.DatasourceSpec(dataset="s", indexing_strategy=extr.LabelSampler(3)._to_proto())
        sampler = CompiledDatasource(ds, spec).sampler
        assert sampler is not None
        got = labels[tuple(_centres(sampler, 0, 3000).T)]
        assert abs(np.mean(got == 1_000_000) - 1 / 3) < 0.03 and abs(np.mean(got == -1) - 1 / 3) < 0.03
        spec.indexing_strategy.CopyFrom(extr.PositiveNegativeSampler(3, positive=0.0)._to_proto())
        sampler = CompiledDatasource(ds, spec).sampler
        assert sampler is not None
        assert (labels[tuple(_centres(sampler, 0, 500).T)] <= 0).all()  # -1 is background with 0
    finally:
        ds.close()


# -- checks ------------------------------------------------------------------------------------------------------


def _patch_sampling(**fields: Any) -> extr.IndexingStrategy:
    class Raw(extr.IndexingStrategy):
        def _to_proto(self) -> spec_pb2.IndexingStrategy:
            return spec_pb2.IndexingStrategy(patch_sampling=spec_pb2.PatchSampling(**fields))

    return Raw()


@pytest.mark.parametrize(
    ("strategy", "error", "words"),
    [
        (extr.UniformSampler((4, 4)), InvalidArgument, "one size per spatial axis"),
        (extr.UniformSampler((4, 0, 4)), InvalidArgument, "patch_shape: each size must lie in 1..4096"),
        (extr.UniformSampler((4, MAX_PATCH_SIZE + 1, 4)), InvalidArgument, "patch_shape"),
        (extr.UniformSampler(4, samples_per_volume=0), InvalidArgument, "samples_per_volume"),
        (extr.UniformSampler(4, samples_per_volume=(1 << 20) + 1), InvalidArgument, "samples_per_volume"),
        (extr.UniformSampler((4096, 4096, 64)), ResourceExhausted, "--max-sample-mb"),
        (extr.LabelSampler(4, {1: -0.5}), InvalidArgument, "label.probabilities"),
        (extr.LabelSampler(4, {1: float("nan")}), InvalidArgument, "finite and non-negative"),
        (extr.LabelSampler(4, {1: 0.0, 2: 0.0}), InvalidArgument, "must not all be zero"),
        (extr.LabelSampler(4, label_category="nope"), NotFound, "label_map.category"),
        (extr.LabelSampler(4, label_entry="nope"), NotFound, "label_map.entry"),
        (extr.LabelSampler(4, label_category="small"), InvalidArgument, "does not match the images"),
        (extr.PositiveNegativeSampler(4, positive=0.0, negative=0.0), InvalidArgument, "positive_negative"),
        (extr.PositiveNegativeSampler(4, positive=float("inf")), InvalidArgument, "finite"),
        (extr.WeightedSampler(4, "nope"), NotFound, "probability_map.category"),
        (_patch_sampling(patch_shape=[4, 4, 4], samples_per_volume=1), None, ""),
    ],
)
def test_spec_checks(dataset: Dataset, strategy: extr.IndexingStrategy, error: type | None, words: str) -> None:
    if error is None:  # no sampler set: uniform
        assert _sampler(dataset, strategy).kind == "uniform"
        return
    with pytest.raises(error) as info:
        _source(dataset, strategy)
    assert words in str(info.value) and "spec.indexing_strategy.patch_sampling" in str(info.value), info.value


def test_repeated_labels_are_refused(dataset: Dataset) -> None:
    probabilities = [spec_pb2.LabelProbability(label=1, probability=1.0)] * 2
    strategy = _patch_sampling(
        patch_shape=[4, 4, 4], samples_per_volume=1, label=spec_pb2.LabelSampler(probabilities=probabilities)
    )
    with pytest.raises(InvalidArgument, match="given more than once"):
        _source(dataset, strategy)


def test_maps_that_are_no_label_or_weight_maps_are_refused_when_indexed(dataset: Dataset) -> None:
    """T1 holds a distinct value per voxel (too many labels without probabilities); T2 is negative."""
    many = _sampler(dataset, extr.LabelSampler(3, label_category="images"))
    with pytest.raises(InvalidArgument, match="distinct values"):
        many.centre(0, Draw(0, 0, 0, 0))
    listed = _sampler(dataset, extr.LabelSampler(3, {5: 1.0}, label_category="images"))
    assert listed.centre(0, Draw(0, 0, 0, 0)) == (0, 0, 4)  # voxel value 5 is the fifth voxel
    negative = _sampler(dataset, extr.WeightedSampler(3, "images", "T2"))
    with pytest.raises(InvalidArgument, match="finite and non-negative"):
        negative.centre(0, Draw(0, 0, 0, 0))


def test_sampled_samples_have_no_fixed_place(dataset: Dataset) -> None:
    src = _source(dataset, extr.UniformSampler(4, samples_per_volume=3))
    assert src.subject_of(4) == (1, 1) and src.subject_of(-1) == (1, 2)
    with pytest.raises(InvalidArgument, match="random places"):
        src.locate(0)


def test_padded_arrays_are_bounded_by_the_sample_limit(dataset: Dataset) -> None:
    """The images' patch passes the compile-time check (one byte a value) but not as float32 once padded."""
    src = _source(dataset, extr.UniformSampler((40, 40, 40)), max_sample_bytes=40**3 * 2 * 2)
    with pytest.raises(ResourceExhausted, match="patch of 'images'"):
        src.sample(0)
