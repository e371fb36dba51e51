"""Indexing strategies, extractors, index expressions and selection strategies with the names and meanings of
``pymia.data.extraction``; they are plain specs that the server interprets (the selection strategies and
``select_indices`` are :mod:`patchwire.client.selection`'s, here as pymia has them).

A pymia user changes only how the datasource is built::

    # pymia:      dataset = extr.PymiaDatasource(hdf_file, indexing_strategy, extractor, transform)
    # patchwire:  dataset = patchwire.client.connect(address).datasource("brains", indexing_strategy, extractor,
    #                                                                     transform)
"""

from __future__ import annotations

import operator
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from patchwire.client import definition as defs
from patchwire.client._datasource import RemoteDatasource
from patchwire.client.indexexpression import IndexExpression
from patchwire.client.selection import (
    ComposeSelection,
    NonBlackSelection,
    NonConstantSelection,
    PercentileSelection,
    SelectionStrategy,
    SubjectSelection,
    WithForegroundSelection,
    select_indices,
)
from patchwire.v1 import spec_pb2

__all__ = [
    "ComposeExtractor",
    "ComposeSelection",
    "DataExtractor",
    "EmptyIndexing",
    "Extractor",
    "FilesExtractor",
    "ImagePropertiesExtractor",
    "ImagePropertyShapeExtractor",
    "IndexExpression",
    "IndexingExtractor",
    "IndexingStrategy",
    "LabelSampler",
    "NamesExtractor",
    "NonBlackSelection",
    "NonConstantSelection",
    "PadDataExtractor",
    "PatchWiseIndexing",
    "PercentileSelection",
    "PositiveNegativeSampler",
    "RandomDataExtractor",
    "RemoteDatasource",
    "SelectionStrategy",
    "SelectiveDataExtractor",
    "SliceIndexing",
    "SubjectExtractor",
    "SubjectSelection",
    "UniformSampler",
    "VoxelWiseIndexing",
    "WeightedSampler",
    "WithForegroundSelection",
    "select_indices",
]


# -- indexing strategies ---------------------------------------------------------------------------------------------


class IndexingStrategy:
    """Base of the indexing strategies (what chunks a datasource's samples are)."""

    def _to_proto(self) -> spec_pb2.IndexingStrategy:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


class EmptyIndexing(IndexingStrategy):
    """One sample per subject: the whole arrays."""

    def _to_proto(self) -> spec_pb2.IndexingStrategy:
        return spec_pb2.IndexingStrategy(empty=spec_pb2.EmptyIndexing())


class SliceIndexing(IndexingStrategy):
    """One sample per slice along ``slice_axis`` (an int, or a tuple for several axes in turn)."""

    def __init__(self, slice_axis: int | tuple[int, ...] = 0) -> None:
        self.slice_axis = (slice_axis,) if isinstance(slice_axis, int) else tuple(slice_axis)

    def _to_proto(self) -> spec_pb2.IndexingStrategy:
        return spec_pb2.IndexingStrategy(slice=spec_pb2.SliceIndexing(slice_axis=self.slice_axis))

    def __repr__(self) -> str:
        return f"SliceIndexing ({self.slice_axis})"


class VoxelWiseIndexing(IndexingStrategy):
    """One sample per voxel of the first ``image_dimension`` axes (the channel vector)."""

    def __init__(self, image_dimension: int = 3) -> None:
        self.image_dimension = image_dimension

    def _to_proto(self) -> spec_pb2.IndexingStrategy:
        return spec_pb2.IndexingStrategy(voxel_wise=spec_pb2.VoxelWiseIndexing(image_dimension=self.image_dimension))


class PatchWiseIndexing(IndexingStrategy):
    """Patches of ``patch_shape`` over the first ``len(patch_shape)`` image axes, in C order over the grid.

    By default the patches are pymia's: non-overlapping, at multiples of the patch size; ``ignore_incomplete=False``
    keeps the (smaller) border patches that do not fit entirely.

    ``stride`` (an int for every axis, or one per patch axis, each 1..patch size) or ``overlap`` (a fraction in
    [0, 1), or one per axis) makes a sliding window instead; give at most one of them. ``overlap`` becomes
    ``stride = max(1, round(patch * (1 - overlap)))`` per axis, with Python's ``round`` (halves go to the even
    integer: patch 10 with overlap 0.25 gives stride 8, patch 5 with overlap 0.5 gives stride 2). Along an axis of
    size ``dim`` the starts are ``0, stride, 2 * stride, ...`` while ``start + patch <= dim``, plus a border patch
    at ``dim - patch`` when the last one does not reach the end, so every voxel is covered by full-size patches
    (as MONAI's and nnU-Net's sliding windows do). Note that an explicit ``stride`` equal to the patch size thus
    differs from the default at the border. An axis shorter than its patch gets one patch at 0, clamped to the
    image (smaller), which ``ignore_incomplete=True`` drops as pymia does. The server checks the stride values.
    """

    def __init__(
        self,
        patch_shape: tuple[int, ...],
        ignore_incomplete: bool = True,
        stride: int | Iterable[int] | None = None,
        overlap: float | Iterable[float] | None = None,
    ) -> None:
        self.patch_shape = tuple(patch_shape)
        self.image_dimension = len(self.patch_shape)
        self.ignore_incomplete = ignore_incomplete
        if stride is not None and overlap is not None:
            raise ValueError("PatchWiseIndexing: give stride or overlap, not both")
        self.overlap: tuple[float, ...] | None = None
        self.stride: tuple[int, ...] | None = None
        if stride is not None:
            # values are checked by the server, which names the bad field; a tuple of the wrong length travels as
            # it is, except an empty one, which would mean "no stride" on the wire
            if isinstance(stride, Iterable):
                self.stride = tuple(operator.index(s) for s in stride)
            else:
                self.stride = (operator.index(stride),) * len(self.patch_shape)
            if not self.stride:
                raise ValueError("PatchWiseIndexing: stride is empty; give one stride per patch axis")
        elif overlap is not None:
            self.overlap = self._per_axis_overlap(overlap)
            for o in self.overlap:
                if not 0 <= o < 1:
                    raise ValueError(f"PatchWiseIndexing: overlap must lie in [0, 1), got {self.overlap}")
            self.stride = tuple(max(1, round(p * (1 - o))) for p, o in zip(self.patch_shape, self.overlap, strict=True))

    def _per_axis_overlap(self, overlap: float | Iterable[float]) -> tuple[float, ...]:
        if not isinstance(overlap, Iterable):
            return (float(overlap),) * len(self.patch_shape)
        values = tuple(float(o) for o in overlap)
        if len(values) != len(self.patch_shape):
            raise ValueError(
                f"PatchWiseIndexing: overlap {values} has {len(values)} values for the "
                f"{len(self.patch_shape)} axes of patch_shape {self.patch_shape}"
            )
        return values

    def _to_proto(self) -> spec_pb2.IndexingStrategy:
        return spec_pb2.IndexingStrategy(
            patch_wise=spec_pb2.PatchWiseIndexing(
                patch_shape=self.patch_shape, ignore_incomplete=self.ignore_incomplete, stride=self.stride or ()
            )
        )

    def __repr__(self) -> str:
        text = f"PatchWiseIndexing (patch shape={self.patch_shape}, ignore incomplete={self.ignore_incomplete}"
        return text + (")" if self.stride is None else f", stride={self.stride})")


# -- patch samplers (random patches drawn on the server) ---------------------------------------------------------------


class _PatchSampler(IndexingStrategy):
    """Random patches drawn on the server (TorchIO's samplers): each subject has ``samples_per_volume`` samples per
    epoch, each a patch of ``patch_size`` (one size per spatial axis; an int is a cube of three axes) centred on a
    voxel the sampler draws. The draw depends only on (seed, epoch, sample index), so an epoch's patches are the
    same whatever the order, batching, workers or ranks, and the next epoch's differ: pass ``seed`` and ``epoch``
    to ``batches()`` (or ``get_samples()``). The centre is the voxel at ``patch_size // 2`` of the patch; a patch
    reaching past the volume is padded with zeros, and its index expression (IndexingExtractor) is its window as it
    is, with negative starts or stops past the end there. A subject without a voxel the sampler may choose has its
    centres drawn uniformly. Sampled patches have no fixed place, so they cannot be assembled."""

    def __init__(self, patch_size: int | Sequence[int], samples_per_volume: int = 1) -> None:
        if isinstance(patch_size, Iterable):
            self.patch_size = tuple(operator.index(p) for p in patch_size)
        else:
            self.patch_size = (operator.index(patch_size),) * 3
        self.samples_per_volume = operator.index(samples_per_volume)

    def _sampling(self) -> spec_pb2.PatchSampling:
        return spec_pb2.PatchSampling(patch_shape=self.patch_size, samples_per_volume=self.samples_per_volume)

    def _to_proto(self) -> spec_pb2.IndexingStrategy:
        return spec_pb2.IndexingStrategy(patch_sampling=self._sampling())

    def __repr__(self) -> str:
        return f"{type(self).__name__} (patch size={self.patch_size}, samples per volume={self.samples_per_volume})"


def _map_entry(category: str, entry: str | None) -> spec_pb2.MapEntry:
    return spec_pb2.MapEntry(category=category, entry=entry or "")


class UniformSampler(_PatchSampler):
    """Random patches centred on voxels drawn uniformly over the volume (TorchIO's ``UniformSampler``, except that
    patches may reach past the border, where they are zero-padded)."""

    def _sampling(self) -> spec_pb2.PatchSampling:
        msg = super()._sampling()
        msg.uniform.SetInParent()
        return msg


class LabelSampler(_PatchSampler):
    """Random patches whose centre's label is drawn with ``label_probabilities`` ({label: probability}, need not sum
    to one; labels left out are never chosen), renormalised over the labels each subject holds, then the centre
    uniformly among that label's voxels (TorchIO's ``LabelSampler``, MONAI's ``RandCropByLabelClasses``). ``None``:
    every label a subject holds (background included) alike. The label map is ``label_entry`` of
    ``label_category`` (``None``: its first entry)."""

    def __init__(
        self,
        patch_size: int | Sequence[int],
        label_probabilities: dict[int, float] | None = None,
        samples_per_volume: int = 1,
        label_category: str = defs.KEY_LABELS,
        label_entry: str | None = None,
    ) -> None:
        super().__init__(patch_size, samples_per_volume)
        self.label_probabilities = (
            None
            if label_probabilities is None
            else {operator.index(k): float(v) for k, v in label_probabilities.items()}
        )
        self.label_category = label_category
        self.label_entry = label_entry

    def _sampling(self) -> spec_pb2.PatchSampling:
        msg = super()._sampling()
        msg.label.label_map.CopyFrom(_map_entry(self.label_category, self.label_entry))
        for label, probability in (self.label_probabilities or {}).items():
            msg.label.probabilities.add(label=label, probability=probability)
        return msg


class PositiveNegativeSampler(_PatchSampler):
    """Random patches centred on a foreground voxel (label > 0) with probability ``positive / (positive +
    negative)``, else on a background one (label <= 0), each uniformly among its kind (MONAI's
    ``RandCropByPosNegLabel``); a subject with voxels of one kind only has all its centres there. The label map is
    ``label_entry`` of ``label_category`` (``None``: its first entry)."""

    def __init__(
        self,
        patch_size: int | Sequence[int],
        positive: float = 1.0,
        negative: float = 1.0,
        samples_per_volume: int = 1,
        label_category: str = defs.KEY_LABELS,
        label_entry: str | None = None,
    ) -> None:
        super().__init__(patch_size, samples_per_volume)
        self.positive = float(positive)
        self.negative = float(negative)
        self.label_category = label_category
        self.label_entry = label_entry

    def _sampling(self) -> spec_pb2.PatchSampling:
        msg = super()._sampling()
        msg.positive_negative.label_map.CopyFrom(_map_entry(self.label_category, self.label_entry))
        msg.positive_negative.positive = self.positive
        msg.positive_negative.negative = self.negative
        return msg


class WeightedSampler(_PatchSampler):
    """Random patches centred on voxels drawn with probability proportional to a non-negative map: entry
    ``probability_entry`` (``None``: the first) of ``probability_category`` (TorchIO's ``WeightedSampler``). A
    subject whose map is zero everywhere has its centres drawn uniformly."""

    def __init__(
        self,
        patch_size: int | Sequence[int],
        probability_category: str,
        probability_entry: str | None = None,
        samples_per_volume: int = 1,
    ) -> None:
        super().__init__(patch_size, samples_per_volume)
        self.probability_category = probability_category
        self.probability_entry = probability_entry

    def _sampling(self) -> spec_pb2.PatchSampling:
        msg = super()._sampling()
        msg.weighted.probability_map.CopyFrom(_map_entry(self.probability_category, self.probability_entry))
        return msg


# -- extractors ------------------------------------------------------------------------------------------------------


class Extractor:
    """Base of the extractors (what each sample holds)."""

    def _to_proto(self) -> spec_pb2.Extractor:
        raise NotImplementedError

    def _pickled_keys(self) -> set[str]:
        """Keys whose values pymia would pickle (``do_pickle=True``); pickling happens on the client."""
        return set()


class ComposeExtractor(Extractor):
    def __init__(self, extractors: Sequence[Extractor]) -> None:
        self.extractors = list(extractors)

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(
            compose=spec_pb2.ComposeExtractor(extractors=[e._to_proto() for e in self.extractors])
        )

    def _pickled_keys(self) -> set[str]:
        return set().union(*(e._pickled_keys() for e in self.extractors))


class DataExtractor(Extractor):
    def __init__(self, categories: Sequence[str] = (defs.KEY_IMAGES,), ignore_indexing: bool = False) -> None:
        self.categories = tuple(categories)
        self.ignore_indexing = ignore_indexing

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(
            data=spec_pb2.DataExtractor(categories=self.categories, ignore_indexing=self.ignore_indexing)
        )


class PadDataExtractor(Extractor):
    """Pads what ``extractor`` reads with zeros: ``padding`` is a tuple (symmetric) or a list of (left, right)."""

    def __init__(
        self, padding: Sequence[int] | Sequence[tuple[int, int]], extractor: Extractor, pad_fn: Any = None
    ) -> None:
        if pad_fn is not None:
            raise ValueError(
                "PadDataExtractor: pad_fn would have to run on the server, which runs no client code; "
                "only zero padding is available"
            )
        if not isinstance(extractor, DataExtractor | SelectiveDataExtractor | RandomDataExtractor):
            raise ValueError('argument extractor needs to have the property "categories" or "category"')
        if isinstance(padding[0], int):
            padding = [(int(p), int(p)) for p in padding]  # type: ignore[arg-type]
        self.padding = [(int(a), int(b)) for a, b in padding]  # type: ignore[misc]
        self.extractor = extractor

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(
            pad_data=spec_pb2.PadDataExtractor(
                padding=[spec_pb2.Padding(before=a, after=b) for a, b in self.padding],
                extractor=self.extractor._to_proto(),
            )
        )


def _selection(selection: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if selection is None:
        return None
    return (selection,) if isinstance(selection, str) else tuple(selection)


class SelectiveDataExtractor(Extractor):
    """The entries (channels) ``selection`` of ``category``, in selection order."""

    def __init__(self, selection: str | Sequence[str] | None = None, category: str = defs.KEY_LABELS) -> None:
        self.selection = _selection(selection)
        self.category = category

    def _to_proto(self) -> spec_pb2.Extractor:
        msg = spec_pb2.SelectiveDataExtractor(category=self.category)
        if self.selection is not None:
            msg.selection.values.extend(self.selection)
        return spec_pb2.Extractor(selective_data=msg)


class RandomDataExtractor(Extractor):
    """One entry of ``category`` chosen at random (among ``selection``).

    pymia draws from numpy's global RNG; here each sample's draw comes from ``numpy.random.RandomState`` seeded
    from (``seed``, sample index), so it is reproducible and independent of order, batching and workers.
    ``seed=None`` picks a random seed once, when the extractor is made.
    """

    def __init__(
        self, selection: str | Sequence[str] | None = None, category: str = defs.KEY_LABELS, seed: int | None = None
    ) -> None:
        self.selection = _selection(selection)
        self.category = category
        self.seed = secrets.randbits(63) if seed is None else int(seed)

    def _to_proto(self) -> spec_pb2.Extractor:
        msg = spec_pb2.RandomDataExtractor(category=self.category, seed=self.seed)
        if self.selection is not None:
            msg.selection.values.extend(self.selection)
        return spec_pb2.Extractor(random_data=msg)


class NamesExtractor(Extractor):
    def __init__(self, cache: bool = True, categories: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS)) -> None:
        self.cache = cache  # the server always caches: names never change while a dataset is served
        self.categories = tuple(categories)

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(names=spec_pb2.NamesExtractor(categories=self.categories))


class SubjectExtractor(Extractor):
    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(subject=spec_pb2.SubjectExtractor())


class IndexingExtractor(Extractor):
    def __init__(self, do_pickle: bool = False) -> None:
        self.do_pickle = do_pickle

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(indexing=spec_pb2.IndexingExtractor(do_pickle=self.do_pickle))

    def _pickled_keys(self) -> set[str]:
        return {defs.KEY_INDEX_EXPR} if self.do_pickle else set()


class ImagePropertiesExtractor(Extractor):
    def __init__(self, do_pickle: bool = False) -> None:
        self.do_pickle = do_pickle

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(image_properties=spec_pb2.ImagePropertiesExtractor(do_pickle=self.do_pickle))

    def _pickled_keys(self) -> set[str]:
        return {defs.KEY_PROPERTIES} if self.do_pickle else set()


class ImagePropertyShapeExtractor(Extractor):
    def __init__(self, numpy_format: bool = True) -> None:
        self.numpy_format = numpy_format

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(
            image_property_shape=spec_pb2.ImagePropertyShapeExtractor(numpy_format=self.numpy_format)
        )


class FilesExtractor(Extractor):
    def __init__(self, cache: bool = True, categories: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS)) -> None:
        self.cache = cache
        self.categories = tuple(categories)

    def _to_proto(self) -> spec_pb2.Extractor:
        return spec_pb2.Extractor(files=spec_pb2.FilesExtractor(categories=self.categories))
