"""pymia's extractors, interpreted from their protobuf specs.

Each compiled extractor has pymia's ``extract(reader, params, extracted)`` shape, with the served
:class:`~patchwire.service._catalog.Dataset` as reader and a :class:`Params` holding subject index, index
expression and sample index. Specs are checked against the dataset when compiled, so an unknown category or entry
is reported before any sample is read.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message

from patchwire.service._catalog import Dataset, to_str
from patchwire.service._errors import InvalidArgument, NotFound, OutOfRange, bounded, bounded_list
from patchwire.service._indexing import Expression
from patchwire.service._limits import check_sample_bytes
from patchwire.v1 import spec_pb2
from patchwire.wire import definition as defs
from patchwire.wire.geometry import ImageProperties
from patchwire.wire.indexexpression import IndexExpression

__all__ = [
    "MAX_NESTING",
    "Extractor",
    "Params",
    "compile_extractor",
    "derive_seed",
    "image_properties",
    "short_field",
]

SITK_UINT8 = 1  # SimpleITK's pixel id of sitkUInt8: pymia rebuilds properties from a uint8 image


@dataclass(frozen=True)
class Params:
    subject_index: int
    expression: Expression
    sample_index: int | None
    """Position in the datasource (None for direct extraction); seeds per-sample randomness."""
    private: bool = True
    """Arrays must be the sample's own (a transform may modify them in place); False allows read-only views."""
    pad: bool = False
    """``expression`` is a window (a tuple of ``slice(start, stop)``) that may reach past the subject's arrays, as a
    sampled patch does: data extractors read the part inside and zero-pad the rest to the window's shape, as
    PadDataExtractor does (without it, h5py clamps what reaches past the end, as in pymia)."""
    max_bytes: int | None = None
    """With ``pad``: most bytes a padded array may have, checked before it is allocated."""


def image_properties(g: ImageProperties) -> ImageProperties:
    """What pymia's ImagePropertiesExtractor gives for a stored geometry: it rebuilds the properties from a uint8
    image (one component, pixel id sitkUInt8), as a new object the sample owns."""
    return ImageProperties(g.size, g.origin, g.spacing, g.direction, len(g.size), 1, SITK_UINT8)


def derive_seed(seed: int, sample_index: int | None) -> int:
    """Seed of a sample's RandomState: depends on (seed, sample index) only, never on order or batching."""
    key = 0 if sample_index is None else int(sample_index) + 1
    return int(np.random.SeedSequence([int(seed), key]).generate_state(1)[0])


def inside(starts: Sequence[int], stops: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The part of the window ``[starts, stops)`` (per leading axis) that lies inside an array of ``shape``: empty
    along an axis where the window lies outside it."""
    out = []
    for start, stop, dim in zip(starts, stops, shape, strict=False):
        first = min(max(int(start), 0), int(dim))
        out.append(slice(first, min(max(int(stop), first), int(dim))))
    return tuple(out)


def zero_padded(data: Any, starts: Sequence[int], stops: Sequence[int], max_bytes: int | None, what: str) -> np.ndarray:
    """``data``, read from the part of the window ``[starts, stops)`` that lies inside its array (:func:`inside`),
    placed into zeros of the window's shape along the leading axes: a window of ``np.pad(array, ...)``. Returned as
    it is when it fills the window. ``max_bytes`` bounds the padded array (RESOURCE_EXHAUSTED naming ``what``, before
    it is allocated); an array of strings cannot be padded (INVALID_ARGUMENT)."""
    if not isinstance(data, np.ndarray):
        raise InvalidArgument(f"{what}: holds strings, which cannot be padded with zeros")
    window = tuple(int(e) - int(s) for s, e in zip(starts, stops, strict=True))
    full_shape = window + data.shape[len(window) :]
    if max_bytes is not None:
        check_sample_bytes(math.prod(full_shape) * data.dtype.itemsize, max_bytes, what)
    if full_shape == data.shape:
        return data
    out = np.zeros(full_shape, dtype=data.dtype)
    offsets = (max(-int(s), 0) for s in starts)
    out[tuple(slice(o, o + n) for o, n in zip(offsets, data.shape, strict=False))] = data
    return out


def read_data(reader: Dataset, location: str, params: Params, private: bool, what: str) -> Any:
    """``location``'s data under ``params``: pymia's read of ``params.expression``, or with ``params.pad`` the
    window it names, zero-padded where it reaches past the array."""
    if not params.pad:
        return reader.read(location, params.expression, private)
    window = params.expression
    if not isinstance(window, tuple) or not all(isinstance(item, slice) for item in window):
        raise InvalidArgument(f"window {bounded(window)}: a padded window is a tuple of slices")
    starts = [item.start for item in window if isinstance(item, slice)]
    stops = [item.stop for item in window if isinstance(item, slice)]
    shape = reader.handle(location).shape
    if len(shape) < len(window):
        raise OutOfRange(f"window {bounded(window)} has {len(window)} axes but {location} has {len(shape)}")
    data = reader.read(location, inside(starts, stops, shape), private)
    return zero_padded(data, starts, stops, params.max_bytes, f"patch of {what!r}")


class Extractor(abc.ABC):
    @abc.abstractmethod
    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None: ...

    def data_categories(self) -> Sequence[str] | None:
        """Categories whose arrays this extractor writes (what PadDataExtractor pads); None if it writes none."""
        return None


class _Compose(Extractor):
    def __init__(self, extractors: list[Extractor]) -> None:
        self.extractors = extractors

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        for e in self.extractors:
            e.extract(reader, params, extracted)


class _Data(Extractor):
    def __init__(self, categories: Sequence[str], ignore_indexing: bool) -> None:
        self.categories = tuple(categories)
        self.ignore_indexing = ignore_indexing

    def data_categories(self) -> Sequence[str]:
        return self.categories

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        for cat in self.categories:
            loc = reader.data_location(cat, params.subject_index)
            data = reader.read(loc) if self.ignore_indexing else read_data(reader, loc, params, params.private, cat)
            extracted[cat] = to_str(data)


class _Names(Extractor):
    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        for cat, names in self.names.items():
            extracted[defs.KEY_PLACEHOLDER_NAMES.format(cat)] = list(names)


class _Selective(Extractor):
    """SelectiveDataExtractor and RandomDataExtractor (which draws one of the selected entries)."""

    def __init__(self, category: str, names: list[str], selection: list[str] | None, seed: int | None) -> None:
        self.category = category
        self.names = names
        self.selection = selection
        self.seed = seed  # None: selective; an int: random
        candidates = range(len(names)) if selection is None else [names.index(s) for s in selection]
        self.indices = np.array(list(candidates))

    def data_categories(self) -> Sequence[str]:
        return (self.category,)

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        names_key = defs.KEY_PLACEHOLDER_NAMES.format(self.category)
        if names_key not in extracted:
            extracted[names_key] = list(self.names)
        loc = reader.data_location(self.category, params.subject_index)
        data = read_data(reader, loc, params, True, self.category)
        entry_names = extracted[names_key]
        if self.seed is None:
            if self.selection is None:
                extracted[self.category] = to_str(data)
                return
            chosen: Any = self.indices
            extracted[defs.KEY_PLACEHOLDER_NAMES_SELECTED.format(self.category)] = list(self.selection)
        else:
            rng = np.random.RandomState(derive_seed(self.seed, params.sample_index))
            chosen = [rng.choice(self.indices)]
            extracted[defs.KEY_PLACEHOLDER_NAMES_SELECTED.format(self.category)] = [entry_names[chosen[0]]]
        taken = np.take(data, chosen, axis=-1)
        extracted[self.category] = to_str(taken.tolist()) if isinstance(data, list) else taken


class _Subject(Extractor):
    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        extracted[defs.KEY_SUBJECT_INDEX] = params.subject_index
        extracted[defs.KEY_SUBJECT] = reader.subjects[params.subject_index]


class _Indexing(Extractor):
    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        extracted[defs.KEY_SUBJECT_INDEX] = params.subject_index
        extracted[defs.KEY_INDEX_EXPR] = IndexExpression.of(params.expression)


class _ImageProperties(Extractor):
    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        geometry = reader.require_geometry(params.subject_index)
        extracted[defs.KEY_PROPERTIES] = image_properties(geometry)


class _ImagePropertyShape(Extractor):
    def __init__(self, numpy_format: bool) -> None:
        self.numpy_format = numpy_format

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        shape = list(reader.require_geometry(params.subject_index).size)
        if self.numpy_format:  # pymia swaps first and last (x, y, z -> z, y, x)
            shape[0], shape[-1] = shape[-1], shape[0]
        extracted[defs.KEY_SHAPE] = tuple(shape)


class _Files(Extractor):
    def __init__(self, categories: Sequence[str]) -> None:
        self.categories = tuple(categories)

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        extracted[defs.KEY_FILE_ROOT] = to_str(reader.read(defs.LOC_FILES_ROOT))
        for cat in self.categories:
            files = reader.read(defs.LOC_FILES_PLACEHOLDER.format(cat), (params.subject_index,))
            extracted[defs.KEY_PLACEHOLDER_FILES.format(cat)] = to_str(files)


class _Pad(Extractor):
    """PadDataExtractor: the window of ``np.pad(full, padding)`` that the padded expression selects.

    Unlike pymia, the incoming expression is not modified, open axes (``slice(None)``) are padded too, and a
    whole-array expression (EmptyIndexing) pads the leading ``len(padding)`` axes instead of failing.
    """

    def __init__(self, padding: list[tuple[int, int]], inner: Extractor, max_bytes: int | None = None) -> None:
        categories = inner.data_categories()
        if categories is None:
            raise InvalidArgument(
                "extractor.pad_data.extractor: must be a DataExtractor, SelectiveDataExtractor "
                "or RandomDataExtractor (an extractor with categories)"
            )
        self.padding = padding
        self.inner = inner
        self.max_bytes = max_bytes
        self.categories = tuple(categories)

    def data_categories(self) -> Sequence[str]:
        return self.categories

    def extract(self, reader: Dataset, params: Params, extracted: dict[str, Any]) -> None:
        expr = params.expression
        items = [slice(None)] * len(self.padding) if isinstance(expr, slice) else list(expr)
        if len(items) != len(self.padding):
            raise InvalidArgument(
                f"extractor.pad_data.padding: {len(self.padding)} axes given but the index "
                f"expression {expr!r} has {len(items)}; give one padding per indexed axis"
            )
        shape = reader.require_image_shapes()[params.subject_index]
        starts, stops = [], []
        for axis, (item, (before, after)) in enumerate(zip(items, self.padding, strict=True)):
            if isinstance(item, slice):
                start = 0 if item.start is None else item.start
                stop = shape[axis] if item.stop is None else item.stop
            else:
                start, stop = item, item + 1
            # a sampled patch's window (``pad``) may reach past the volume already: the sampler bounded it
            if not params.pad and (not 0 <= stop - start <= shape[axis] or not -shape[axis] <= start <= shape[axis]):
                raise OutOfRange(
                    f"index expression {bounded(expr)}: axis {axis} selects [{start}, {stop}), which does not lie "
                    f"within the {shape[axis]} voxels of subject {params.subject_index} that padding can extend"
                )
            starts.append(start - before)
            stops.append(stop + after)
        read_expr = tuple(slice(max(s, 0), e) for s, e in zip(starts, stops, strict=True))
        self.inner.extract(
            reader, Params(params.subject_index, read_expr, params.sample_index, params.private), extracted
        )
        for cat in self.categories:
            extracted[cat] = zero_padded(extracted[cat], starts, stops, self.max_bytes, f"padded {cat!r}")


def _selection(msg: spec_pb2.StringList | None, has: bool) -> list[str] | None:
    return list(msg.values) if has and msg is not None else None


MAX_NESTING = 48
"""Deepest nesting of extractors (ComposeExtractor, PadDataExtractor) and of ComposeTransforms any spec may have,
whatever the server's ``--max-spec-depth`` (checked before compiling, RESOURCE_EXHAUSTED): protobuf parses no request
nested deeper (each level is two messages, and it stops at 100), so a deeper spec can only come from within the
process, and is malformed."""
MAX_PADDING = 1 << 16
"""Most voxels PadDataExtractor adds on one side of an axis (more than any image has: larger padding is malformed)."""


def short_field(field: str) -> str:
    """A field path cut to its ends when deep nesting makes it long."""
    return field if len(field) <= 120 else f"{field[:50]}...{field[-60:]}"


def spec_choice(msg: Message, oneof: str, field: str, depth: int, nesting: str) -> tuple[str, Any, str]:
    """(kind, message, field path) of the one choice an extractor or transform spec makes in its ``oneof``, after
    refusing a spec ``depth`` deep beyond MAX_NESTING (``nesting`` names the specs that nest) and one with no choice."""
    if depth > MAX_NESTING:
        raise InvalidArgument(
            f"{short_field(field)}: {oneof}s nested {depth} deep; {nesting} may be nested at most {MAX_NESTING} deep"
        )
    kind = msg.WhichOneof(oneof)
    if kind is None:
        raise InvalidArgument(f"{field}: no {oneof} is set")
    return kind, getattr(msg, kind), f"{field}.{kind}"


def compile_extractor(
    msg: spec_pb2.Extractor, dataset: Dataset, field: str = "extractor", max_bytes: int | None = None, depth: int = 1
) -> Extractor:
    """Compiles an extractor spec, checking categories and entry names against ``dataset``; ``max_bytes`` bounds
    what PadDataExtractor may pad a category to. ``depth``: how deep ``msg`` lies in nested extractors (refused
    beyond MAX_NESTING before going deeper)."""
    kind, sub, where = spec_choice(msg, "extractor", field, depth, "ComposeExtractor and PadDataExtractor")
    if kind == "compose":
        return _Compose(
            [
                compile_extractor(e, dataset, f"{where}.extractors[{i}]", max_bytes, depth + 1)
                for i, e in enumerate(sub.extractors)
            ]
        )
    if kind == "data":
        for cat in sub.categories:
            dataset.check_category(cat, f"{where}.categories")
        return _Data(list(sub.categories), sub.ignore_indexing)
    if kind == "names":
        return _Names({cat: dataset.names_of(cat, f"{where}.categories") for cat in sub.categories})
    if kind in ("selective_data", "random_data"):
        names = dataset.names_of(sub.category, f"{where}.category")
        selection = _selection(sub.selection, sub.HasField("selection"))
        for s in selection or ():
            if s not in names:
                raise NotFound(
                    f"{where}.selection: {bounded(s)} is not an entry of category {bounded(sub.category)} "
                    f"(entries: {bounded_list(names, quote=False)})"
                )
        if selection is not None and not selection:
            raise InvalidArgument(f"{where}.selection: select at least one entry (or none to select all)")
        return _Selective(sub.category, names, selection, sub.seed if kind == "random_data" else None)
    if kind == "subject":
        return _Subject()
    if kind == "indexing":
        return _Indexing()
    if kind == "image_properties":
        if dataset.geometry is None:
            dataset.require_geometry(0)
        return _ImageProperties()
    if kind == "image_property_shape":
        if dataset.geometry is None:
            dataset.require_geometry(0)
        return _ImagePropertyShape(sub.numpy_format)
    if kind == "files":
        for cat in sub.categories:
            loc = defs.LOC_FILES_PLACEHOLDER.format(cat)
            dataset.check_category(cat, f"{where}.categories")
            dataset.handle(loc)
        return _Files(list(sub.categories))
    if kind == "pad_data":
        if not sub.padding:
            raise InvalidArgument(f"{where}.padding: give the padding of at least one axis")
        padding = []
        for i, p in enumerate(sub.padding):
            if not (0 <= p.before <= MAX_PADDING and 0 <= p.after <= MAX_PADDING):
                raise InvalidArgument(
                    f"{where}.padding[{i}]: padding must lie in 0..{MAX_PADDING}, got ({p.before}, {p.after})"
                )
            padding.append((int(p.before), int(p.after)))
        if not sub.HasField("extractor"):
            raise InvalidArgument(f"{where}.extractor: the extractor whose data to pad is missing")
        return _Pad(
            padding, compile_extractor(sub.extractor, dataset, f"{where}.extractor", max_bytes, depth + 1), max_bytes
        )
    raise InvalidArgument(f"{field}: unknown extractor {kind!r}")
