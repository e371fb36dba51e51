"""Random patches drawn on the server: spec.proto's ``PatchSampling`` (TorchIO's samplers, MONAI's RandCropBy*).

Each subject of a sampled datasource has ``samples_per_volume`` samples. Sample ``i`` (the k-th of its subject) is a
patch whose centre is drawn from ``Draw.index_generator()``, seeded by (seed, epoch, i) only, so an epoch's patches
are the same whatever the order, batching, workers or ranks that ask for them, and differ from epoch to epoch:

- uniform: every voxel of the volume alike;
- label: a label with the given probabilities, renormalised over the labels the subject holds (without
  probabilities every label it holds alike), then a voxel of that label uniformly;
- positive/negative: a foreground voxel (label > 0) with probability positive / (positive + negative), else a
  background one (every other voxel: label <= 0, as MONAI's ``RandCropByPosNegLabel`` takes it), again over the
  classes the subject holds;
- weighted: a voxel with probability proportional to a non-negative map.

A subject without any voxel the sampler may choose has its centres drawn uniformly. The patch is
``[centre - patch // 2, centre - patch // 2 + patch)`` along each spatial axis (TorchIO's convention); its parts
outside the volume are zeros (:attr:`~patchwire.service._extraction.Params.pad`). The sample's index expression
(IndexingExtractor) is that window as it is: its starts may be negative and its stops past the end at the borders,
so it says where the patch lies but, there, is not a numpy index of the volume (a negative start would count from
the end); it indexes ``np.pad(volume, [(p // 2, p) for p in patch_shape])`` once shifted by ``patch // 2``.

Where a subject's voxels lie is indexed once per (dataset version, subject, map entry) and kept in a bounded,
thread-safe LRU :class:`IndexCache`. The index holds counts per slice, never voxel positions: for each class (a
label; positive or negative) the cumulative number of its voxels over the slices along the first axis, and for a
weighted map the cumulative sums of its slices. A draw picks the class, then its j-th voxel: the slice that holds it
from the cumulative counts, then the voxel by ``np.flatnonzero`` over that one slice, read through the dataset's
block cache (where the index build left it, so a subject's volume is read from disk once while its patches are cut).
A 181 x 217 x 181 label map with six labels thus costs 181 x 6 counts (4 KB) instead of 57 MB of int64 positions,
and a draw one slice of work (40 thousand voxels). A LabelSampler without probabilities takes at most MAX_LABELS
distinct values as labels (a map of intensities is refused as soon as a slab shows it).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from patchwire.service._catalog import Dataset
from patchwire.service._errors import FailedPrecondition, InvalidArgument, NotFound, bounded, bounded_list
from patchwire.service._indexing import Expression, Indexing
from patchwire.service._limits import check_sample_bytes
from patchwire.service._randomness import Draw
from patchwire.v1 import spec_pb2
from patchwire.wire import definition as defs

__all__ = [
    "DEFAULT_INDEX_CACHE",
    "MAX_LABELS",
    "MAX_PATCH_SIZE",
    "MAX_SAMPLES_PER_VOLUME",
    "IndexCache",
    "PatchSampler",
    "compile_sampler",
]

MAX_PATCH_SIZE = 4096
"""Largest patch size along one axis."""
MAX_SAMPLES_PER_VOLUME = 1 << 20
"""Most samples per subject and epoch."""
MAX_LABELS = 4096
"""Most distinct values a label map may hold for a LabelSampler without probabilities (each is a class)."""
SLAB_VOXELS = 1 << 20
"""About how many voxels of a map are read and counted at a time when a subject is indexed."""

FIELD = "spec.indexing_strategy.patch_sampling"


class IndexCache:
    """Subject indexes (where each class's voxels lie), least recently used dropped beyond ``capacity_bytes``;
    thread-safe. Keys hold the dataset version's identity: an entry of a version that was retired and freed is
    never taken for a newer one, and ages out."""

    def __init__(self, capacity_bytes: int = 64 << 20) -> None:
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self.builds = 0
        """Indexes built so far (how often a map was read and counted)."""
        self._items: OrderedDict[Hashable, tuple[weakref.ref[Dataset], _Index]] = OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def _hit(self, key: Hashable, dataset: Dataset) -> _Index | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0]() is not dataset:  # a freed version's id reused by another object
            del self._items[key]
            self.nbytes -= item[1].nbytes
            return None
        self._items.move_to_end(key)
        return item[1]

    def get(self, dataset: Dataset, key: tuple[Hashable, ...], build: Callable[[], _Index]) -> _Index:
        """The index under ``key`` for ``dataset``, built by ``build()`` once (other threads that want it meanwhile
        wait for that build instead of repeating it)."""
        full = (id(dataset), *key)
        with self._lock:
            hit = self._hit(full, dataset)
            if hit is not None:
                return hit
            building = self._building.setdefault(full, threading.Lock())
        with building:
            with self._lock:
                hit = self._hit(full, dataset)
                if hit is not None:
                    return hit
            try:
                index = build()
            except BaseException:
                with self._lock:
                    self._building.pop(full, None)
                raise
            with self._lock:  # stored before the build lock is dropped: nobody builds it again meanwhile
                self.builds += 1
                self._building.pop(full, None)
                if index.nbytes <= self.capacity_bytes:
                    self._items[full] = (weakref.ref(dataset), index)
                    self.nbytes += index.nbytes
                    while self.nbytes > self.capacity_bytes:
                        _, (_, old) = self._items.popitem(last=False)
                        self.nbytes -= old.nbytes
            return index

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


DEFAULT_INDEX_CACHE = IndexCache()
"""The cache every sampler uses unless given another: indexes are shared by every datasource of a server."""


@dataclass(frozen=True)
class _Index:
    """Where the voxels a sampler may choose lie in one subject's map.

    ``cumulative[c, z]``: how many voxels of class ``c`` slices ``0..z`` hold (counts; for a weighted map a single
    row of sums of weights). ``classes``: the class of each row (label values; or 1 and 0 for positive and
    negative)."""

    classes: np.ndarray
    cumulative: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.classes.nbytes + self.cumulative.nbytes) + 64

    def totals(self) -> np.ndarray:
        return self.cumulative[:, -1] if self.cumulative.shape[1] else np.zeros(len(self.classes))


@dataclass(frozen=True)
class _Map:
    """Where a sampler reads a map: a category's entry, channel ``channel`` of its arrays (arrays without an entry
    axis are their one entry)."""

    category: str
    entry: str
    channel: int


class PatchSampler(Indexing):
    """A compiled ``PatchSampling``: the count per subject (``samples_per_volume``) as an indexing strategy, and
    each sample's window from its draw (:meth:`window`). Samples have no fixed place: :meth:`expression` refuses."""

    def __init__(
        self,
        msg: spec_pb2.PatchSampling,
        dataset: Dataset,
        max_sample_bytes: int | None = None,
        cache: IndexCache | None = None,
        field: str = FIELD,
    ) -> None:
        self.dataset = dataset
        self.field = field
        self.cache = cache if cache is not None else DEFAULT_INDEX_CACHE
        shape = tuple(int(p) for p in msg.patch_shape)
        if not shape:
            raise InvalidArgument(f"{field}.patch_shape: give one size per spatial axis of the images")
        if any(not 1 <= p <= MAX_PATCH_SIZE for p in shape):
            raise InvalidArgument(
                f"{field}.patch_shape: each size must lie in 1..{MAX_PATCH_SIZE}, got {bounded(shape)}"
            )
        self.patch_shape = shape
        if not 1 <= msg.samples_per_volume <= MAX_SAMPLES_PER_VOLUME:
            raise InvalidArgument(
                f"{field}.samples_per_volume: must lie in 1..{MAX_SAMPLES_PER_VOLUME}, got {msg.samples_per_volume}"
            )
        self.samples_per_volume = int(msg.samples_per_volume)
        self.max_sample_bytes = max_sample_bytes
        self.kind = msg.WhichOneof("sampler") or "uniform"
        self.map: _Map | None = None
        self.probabilities: np.ndarray | None = None
        """Per class: label sampler (None: every label alike), positive/negative (positive first)."""
        self.labels: np.ndarray | None = None
        """The labels a label sampler was given probabilities for (None: every label)."""
        if self.kind == "label":
            self.map = self._map(msg.label.label_map, f"{field}.label.label_map")
            if msg.label.probabilities:
                labels = [int(p.label) for p in msg.label.probabilities]
                if len(set(labels)) != len(labels):
                    repeated = sorted({v for v in labels if labels.count(v) > 1})
                    raise InvalidArgument(
                        f"{field}.label.probabilities: labels {bounded_list(repeated)} are given more than once"
                    )
                probabilities = [float(p.probability) for p in msg.label.probabilities]
                self._check_weights(probabilities, f"{field}.label.probabilities")
                order = np.argsort(labels)
                self.labels = np.asarray(labels, dtype=np.int64)[order]
                self.probabilities = np.asarray(probabilities, dtype=np.float64)[order]
        elif self.kind == "positive_negative":
            sub = msg.positive_negative
            self.map = self._map(sub.label_map, f"{field}.positive_negative.label_map")
            self._check_weights([sub.positive, sub.negative], f"{field}.positive_negative (positive, negative)")
            self.probabilities = np.array([sub.positive, sub.negative], dtype=np.float64)
        elif self.kind == "weighted":
            self.map = self._map(msg.weighted.probability_map, f"{field}.weighted.probability_map")
        elif self.kind != "uniform":
            raise InvalidArgument(f"{field}: unknown sampler {self.kind!r}")
        self._map_shapes = self._read_map_shapes()

    # -- compile-time checks --------------------------------------------------------------------------------------

    @staticmethod
    def _check_weights(values: Sequence[float], field: str) -> None:
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise InvalidArgument(f"{field}: probabilities must be finite and non-negative, got {bounded(values)}")
        if not sum(values) > 0:
            raise InvalidArgument(f"{field}: probabilities must not all be zero")

    def _map(self, msg: spec_pb2.MapEntry, field: str) -> _Map:
        category = msg.category or defs.KEY_LABELS
        self.dataset.check_category(category, f"{field}.category")
        names = self.dataset.entry_names.get(category)
        if msg.entry:
            names = self.dataset.names_of(category, f"{field}.entry")
            if msg.entry not in names:
                raise NotFound(
                    f"{field}.entry: {bounded(msg.entry)} is not an entry of category {bounded(category)} "
                    f"(entries: {bounded_list(names, quote=False)})"
                )
            return _Map(category, msg.entry, names.index(msg.entry))
        return _Map(category, names[0] if names else "", 0)

    def _read_map_shapes(self) -> list[tuple[int, ...]] | None:
        """The shapes of the map category's arrays per subject, from the file's shape table (None: no map, or no
        table, when they are looked up per subject)."""
        if self.map is None:
            return None
        location = defs.LOC_SHAPE_PLACEHOLDER.format(self.map.category)
        try:
            rows = self.dataset.read(location)
        except NotFound:
            return None
        return [tuple(int(v) for v in row) for row in rows]

    def validate(self, shape: Sequence[int], where: str) -> None:
        n = len(self.patch_shape)
        if len(shape) != n + 1:
            raise InvalidArgument(
                f"{self.field}.patch_shape: {n} sizes, but the images of {where} have shape {tuple(shape)}: "
                f"give one size per spatial axis ({len(shape) - 1}; the last axis, the entries, stays whole)"
            )
        voxels = math.prod(self.patch_shape) * max(int(shape[-1]), 1)
        if self.max_sample_bytes is not None:  # at least a byte per value; each array is checked when padded
            check_sample_bytes(voxels, self.max_sample_bytes, f"{self.field}.patch_shape: a patch of the images")

    def check_subject(self, subject: int, where: str) -> None:
        """Raises InvalidArgument when the sampler's map of ``subject`` does not cover its images voxel for voxel."""
        if self.map is None:
            return
        image = self.dataset.require_image_shapes()[subject]
        n = len(self.patch_shape)
        if self._map_shapes is not None and subject < len(self._map_shapes):
            shape = self._map_shapes[subject]
        else:
            shape = self.dataset.handle(self.dataset.data_location(self.map.category, subject)).shape
        if len(shape) not in (n, n + 1) or tuple(shape[:n]) != tuple(image[:n]):
            raise InvalidArgument(
                f"{self.field}: the {bounded(self.map.category)} arrays of {where} have shape {tuple(shape)}, "
                f"which does not match the images' spatial shape {tuple(image[:n])}"
            )
        if len(shape) == n + 1 and not 0 <= self.map.channel < shape[n]:
            raise InvalidArgument(
                f"{self.field}: entry {bounded(self.map.entry)} is channel {self.map.channel} but the "
                f"{bounded(self.map.category)} arrays of {where} have {shape[n]}"
            )

    # -- the indexing strategy ------------------------------------------------------------------------------------

    def count(self, shape: Sequence[int]) -> int:
        """``samples_per_volume``; none for an empty volume (no voxel to centre a patch on)."""
        return self.samples_per_volume if all(int(d) > 0 for d in shape[: len(self.patch_shape)]) else 0

    def expression(self, shape: Sequence[int], k: int) -> Expression:
        raise InvalidArgument(
            f"{self.field}: sampled patches lie at random places (drawn per seed and epoch), not at fixed ones; "
            "assembly and other uses of a sample's fixed place need a deterministic indexing strategy"
        )

    # -- drawing --------------------------------------------------------------------------------------------------

    def window(self, subject: int, draw: Draw) -> tuple[slice, ...]:
        """The patch of a sample of ``subject`` with randomness ``draw``: one ``slice(start, stop)`` per spatial axis,
        which may reach past the volume (to be zero-padded)."""
        centre = self.centre(subject, draw)
        return tuple(slice(c - p // 2, c - p // 2 + p) for c, p in zip(centre, self.patch_shape, strict=True))

    def centre(self, subject: int, draw: Draw) -> tuple[int, ...]:
        """The voxel a sample's patch is centred on."""
        spatial = tuple(int(d) for d in self.dataset.require_image_shapes()[subject][: len(self.patch_shape)])
        rng = draw.index_generator()
        if self.map is not None:
            index = self._index(subject, spatial)
            if self.kind == "weighted":
                found = self._weighted(subject, index, spatial, rng)
            else:
                found = self._of_class(subject, index, spatial, rng)
            if found is not None:
                return found
        return tuple(int(v) for v in rng.integers(0, spatial))

    def _of_class(
        self, subject: int, index: _Index, spatial: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[int, ...] | None:
        """A label sampler's or positive/negative sampler's centre: a class, then a voxel of it (None: no class the
        sampler may choose is present)."""
        totals = index.totals()
        if self.probabilities is None:
            weights = (totals > 0).astype(np.float64)
        elif self.kind == "label":
            assert self.labels is not None
            weights = self.probabilities[np.searchsorted(self.labels, index.classes)] * (totals > 0)
        else:  # classes 1 (positive) and 0 (negative), in the index's order
            weights = np.where(index.classes == 1, self.probabilities[0], self.probabilities[1]) * (totals > 0)
        total = weights.sum()
        if not total > 0:
            return None
        c = int(rng.choice(len(weights), p=weights / total))
        j = int(rng.integers(int(totals[c])))
        cumulative = index.cumulative[c]
        z = int(np.searchsorted(cumulative, j, side="right"))
        within = j - (int(cumulative[z - 1]) if z else 0)
        values = self._slice(subject, z)
        if self.kind == "positive_negative":
            members = values > 0 if index.classes[c] == 1 else values <= 0
        else:
            members = values == index.classes[c]
        flat = int(np.flatnonzero(members)[within])
        return (z, *(int(v) for v in np.unravel_index(flat, spatial[1:])))

    def _weighted(
        self, subject: int, index: _Index, spatial: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[int, ...] | None:
        """A weighted sampler's centre: a slice in proportion to its sum, then a voxel of it in proportion to its
        weight (None: the map is zero everywhere)."""
        cumulative = index.cumulative[0]
        total = float(cumulative[-1]) if len(cumulative) else 0.0
        if not total > 0:
            return None
        z = _pick(cumulative, rng.random() * total)
        cumulative = np.cumsum(np.asarray(self._slice(subject, z), dtype=np.float64).ravel())
        flat = _pick(cumulative, rng.random() * float(cumulative[-1]))
        return (z, *(int(v) for v in np.unravel_index(flat, spatial[1:])))

    # -- the subject index ----------------------------------------------------------------------------------------

    def _slice(self, subject: int, z: int) -> np.ndarray:
        """Slice ``z`` of a subject's map (spatial axes only), read-only, through the dataset's block cache."""
        return self._read(subject, z)

    def _read(self, subject: int, first: int | slice) -> np.ndarray:
        """``first`` (a slice index or a range of them) of a subject's map, read-only, through the block cache."""
        assert self.map is not None
        location = self.dataset.data_location(self.map.category, subject)
        n = len(self.patch_shape)
        ndim = self.dataset.handle(location).ndim
        rest: tuple[int | slice, ...] = (slice(None),) * (n - 1)
        expression = (first, *rest) if ndim == n else (first, *rest, self.map.channel)
        data = self.dataset.read(location, expression, False)
        if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
            raise InvalidArgument(
                f"{self.field}: category {bounded(self.map.category)} of subject {subject} is not numeric; "
                "a sampler's map must be"
            )
        return data

    def _index(self, subject: int, spatial: tuple[int, ...]) -> _Index:
        assert self.map is not None
        labels = None if self.labels is None else tuple(int(v) for v in self.labels)
        what = self.kind if self.kind != "label" else ("label", labels)
        key = (subject, self.map.category, self.map.channel, what)
        return self.cache.get(self.dataset, key, lambda: self._build(subject, spatial))

    def _build(self, subject: int, spatial: tuple[int, ...]) -> _Index:
        """Reads a subject's map slab by slab (through the block cache, where its blocks stay for the patches) and
        counts its classes per slice (sums its weights per slice)."""
        assert self.map is not None
        slices = spatial[0]
        per_slice = math.prod(spatial[1:])
        rows = max(1, SLAB_VOXELS // max(per_slice, 1))
        where = f"subject {subject} ({self.dataset.subjects[subject]!r})"
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (classes, counts (rows, classes)) per slab
        sums: list[np.ndarray] = []
        seen = np.zeros(0)  # every label found so far, without probabilities
        for a in range(0, slices, rows):
            slab = self._read(subject, slice(a, min(a + rows, slices))).reshape(-1, per_slice)
            if self.kind == "weighted":
                sums.append(_slice_sums(slab, f"{self.field}.weighted.probability_map: the map of {where}"))
            elif self.kind == "positive_negative":
                counts = np.stack([np.count_nonzero(slab > 0, axis=1), np.count_nonzero(slab <= 0, axis=1)], axis=1)
                parts.append((np.array([1, 0]), counts))
            else:
                # without probabilities every label is a class, at most MAX_LABELS of them; else the listed ones
                counted = _label_counts(slab, self.labels, MAX_LABELS if self.labels is None else len(self.labels))
                if counted is not None and self.labels is None:
                    seen = np.union1d(seen, counted[0])
                if counted is None or len(seen) > MAX_LABELS:
                    raise InvalidArgument(
                        f"{self.field}.label: the {bounded(self.map.category)} map of {where} holds more than "
                        f"{MAX_LABELS} distinct values, the most a LabelSampler without probabilities takes as "
                        "labels: give probabilities for the labels to sample"
                    )
                parts.append(counted)
        if self.kind == "weighted":
            cumulative = np.cumsum(np.concatenate(sums))[np.newaxis, :]
            return _Index(np.zeros(1), cumulative)
        classes, counts = _merge(parts, slices)
        dtype = np.int32 if per_slice * slices < (1 << 31) else np.int64
        return _Index(classes, np.cumsum(counts, axis=0, dtype=dtype).T.copy())


def _pick(cumulative: np.ndarray, u: float) -> int:
    """The position whose interval of ``cumulative`` (non-decreasing, non-negative steps) holds ``u``; a position
    with a positive step even where rounding put ``u`` at or past the end."""
    i = int(np.searchsorted(cumulative, u, side="right"))
    if i >= len(cumulative):
        steps = np.diff(cumulative, prepend=0.0)
        i = int(np.flatnonzero(steps > 0)[-1])
    return i


def _slice_sums(slab: np.ndarray, where: str) -> np.ndarray:
    weights = slab.astype(np.float64, copy=False)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise InvalidArgument(f"{where}: weights must be finite and non-negative")
    return weights.sum(axis=1)


def _label_counts(slab: np.ndarray, listed: np.ndarray | None, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, counts): the labels a slab of rows holds (only ``listed`` ones, if given; never NaN) and how many
    voxels of each every row holds, shape (rows, labels). None when it holds more than ``limit`` labels (known before
    anything is counted per row: a map of distinct values is refused without counts of each)."""
    rows = slab.shape[0]
    if slab.size == 0:
        return np.zeros(0), np.zeros((rows, 0), dtype=np.int64)
    row_of = np.arange(rows, dtype=np.int64)[:, np.newaxis]
    if slab.dtype.kind in "biu":
        low, high = int(slab.min()), int(slab.max())
        span = high - low + 1
        if span * rows <= 1 << 22:  # a bincount over (row, label) pairs
            counts = np.bincount((slab.astype(np.int64) - low + row_of * span).ravel(), minlength=rows * span)
            counts = counts.reshape(rows, span)
            present = np.flatnonzero(counts.any(axis=0))
            labels, counts = present + low, counts[:, present]
            if listed is not None:
                keep = np.isin(labels, listed)
                labels, counts = labels[keep], counts[:, keep]
            return (labels, counts) if len(labels) <= limit else None
    labels, inverse = np.unique(slab, return_inverse=True)
    keep = np.isin(labels, listed) if listed is not None else np.ones(len(labels), dtype=bool)
    if labels.dtype.kind == "f":
        keep &= ~np.isnan(labels)
    kept = int(keep.sum())
    if kept > limit:
        return None
    code = np.full(len(labels), -1, dtype=np.int64)
    code[keep] = np.arange(kept)
    codes = code[inverse.reshape(slab.shape)]
    counted = codes >= 0
    pairs = (codes + np.broadcast_to(row_of * kept, slab.shape))[counted]
    return labels[keep], np.bincount(pairs, minlength=rows * kept).reshape(rows, kept)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], slices: int) -> tuple[np.ndarray, np.ndarray]:
    """The classes of every slab and their counts per slice, shape (slices, classes)."""
    if not parts:
        return np.zeros(0), np.zeros((slices, 0), dtype=np.int64)
    classes = np.unique(np.concatenate([c for c, _ in parts]))
    counts = np.zeros((slices, len(classes)), dtype=np.int64)
    row = 0
    for labels, part in parts:
        counts[row : row + part.shape[0], np.searchsorted(classes, labels)] = part
        row += part.shape[0]
    return classes, counts


def compile_sampler(
    msg: spec_pb2.PatchSampling, dataset: Dataset, max_sample_bytes: int | None = None, field: str = FIELD
) -> PatchSampler:
    """A sampler of ``dataset`` from its spec, checked against the dataset's categories and entries."""
    if dataset.image_shapes is None:
        raise FailedPrecondition(f"dataset {dataset.name!r}: patch sampling needs the images' shapes")
    return PatchSampler(msg, dataset, max_sample_bytes, field=field)
