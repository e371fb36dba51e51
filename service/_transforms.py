"""pymia's transforms, interpreted from their protobuf specs, with pymia's ``entries`` and ``loop_axis`` rules.

Numeric parameters arrive as :class:`Scalar` (int or float kept apart), so numpy promotes them exactly as it would
for the Python values the user wrote; results are bit-identical to pymia 0.3.4's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from patchwire.service._augmentation import AUGMENTATIONS, compile_augmentation
from patchwire.service._errors import MAX_ECHO_CHARS, InvalidArgument, bounded, bounded_list
from patchwire.service._extraction import spec_choice
from patchwire.service._limits import check_sample_bytes
from patchwire.service._randomness import Draw
from patchwire.v1 import spec_pb2, tensor_pb2

__all__ = ["Transform", "augments", "compile_transform", "writes_in_place"]

Sample = dict[str, Any]
Step = Callable[[Sample], Sample]
"""A deterministic transform."""
EntryFn = Callable[[np.ndarray, str], np.ndarray]
_NO_DRAW = Draw(0, 0, 0, 0)


class Transform:
    """A compiled transform chain: ``transform(sample, draw)``; its random transforms draw from ``draw`` (each from
    its own generator, numbered in chain order), the others ignore it."""

    def __init__(self, apply: Callable[[Sample, Draw], Sample]) -> None:
        self._apply = apply

    def __call__(self, sample: Sample, draw: Draw = _NO_DRAW) -> Sample:
        return self._apply(sample, draw)


MAX_SIZE = 1 << 16
"""Largest axis SizeCorrection pads to (more than any image has: larger sizes are malformed)."""
ENTRY_NOT_EXTRACTED = 'Transform can not be applied because entry "{}" was not extracted'


def _name(entry: str) -> str:
    """An entry name a client sent, as it is when short, else cut (see ``_errors.bounded``)."""
    return entry if len(entry) <= MAX_ECHO_CHARS else bounded(entry)


def _check_ndarray(obj: Any) -> np.ndarray:
    if not isinstance(obj, np.ndarray):
        raise ValueError("entry must be 'ndarray'")
    return obj


def _loop_entries(sample: Sample, fn: EntryFn, entries: Sequence[str], loop_axis: int | None) -> Sample:
    for entry in entries:
        if entry not in sample:
            raise ValueError(ENTRY_NOT_EXTRACTED.format(_name(entry)))
        arr = _check_ndarray(sample[entry])
        if loop_axis is None:
            arr = fn(arr, entry)
        else:  # in place, one index of loop_axis at a time (result cast to the array's dtype)
            slicing: list[Any] = [slice(None)] * arr.ndim
            for i in range(arr.shape[loop_axis]):
                slicing[loop_axis] = i
                arr[tuple(slicing)] = fn(arr[tuple(slicing)], entry)
        sample[entry] = arr
    return sample


def _entry_transform(fn: EntryFn, entries: Sequence[str], loop_axis: int | None = None) -> Step:
    entries = tuple(entries)
    return lambda sample: _loop_entries(sample, fn, entries, loop_axis)


def _scalar(msg: tensor_pb2.Scalar, field: str, default: Any = None) -> Any:
    kind = msg.WhichOneof("kind")
    if kind == "int_value":
        return int(msg.int_value)
    if kind == "float_value":
        return float(msg.float_value)
    if default is not None:
        return default
    raise InvalidArgument(f"{field}: value is required")


def _loop_axis(sub: Any) -> int | None:
    return int(sub.loop_axis) if sub.HasField("loop_axis") else None


def _rescale(lower: Any, upper: Any) -> EntryFn:
    def fn(arr: np.ndarray, entry: str) -> np.ndarray:
        dtype = arr.dtype
        lo, hi = arr.min(), arr.max()
        if lo == hi:
            raise ValueError("cannot normalize when min == max")
        return ((arr - lo) / (hi - lo) * (upper - lower) + lower).astype(dtype)

    return fn


def _normalize(arr: np.ndarray, entry: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError("Array must be floating type")
    return (arr - arr.mean()) / arr.std()


def _clip(upper: Any, lower: Any) -> EntryFn:
    def fn(arr: np.ndarray, entry: str) -> np.ndarray:
        upper_max = np.percentile(arr, upper)
        arr[arr > upper_max] = upper_max
        lower_max = np.percentile(arr, lower)  # on the already clipped array, as pymia does
        arr[arr < lower_max] = lower_max
        return arr

    return fn


def _relabel(changes: list[tuple[Any, Any]]) -> EntryFn:
    def fn(arr: np.ndarray, entry: str) -> np.ndarray:
        for new_label, old_label in changes:
            arr[arr == old_label] = new_label
        return arr

    return fn


def _size_correction(
    shape: list[int | None], pad_value: Any, entries: Sequence[str], max_bytes: int | None = None
) -> Step:
    def apply(sample: Sample) -> Sample:
        for entry in entries:
            if entry not in sample:
                raise ValueError(ENTRY_NOT_EXTRACTED.format(_name(entry)))
            arr = _check_ndarray(sample[entry])
            if len(shape) > arr.ndim:
                raise ValueError(f"Shape dimension needs to be less or equal to {arr.ndim}")
            if max_bytes is not None:  # the corrected size, before anything is padded
                final = [
                    n if size is None else size
                    for n, size in zip(arr.shape, [*shape, *[None] * arr.ndim], strict=False)
                ]
                check_sample_bytes(math.prod(final) * arr.dtype.itemsize, max_bytes, f"entry {entry!r}")
            for idx, size in enumerate(shape):
                if size is None or size == arr.shape[idx]:
                    continue
                diff = abs(arr.shape[idx] - size)
                if size < arr.shape[idx]:  # crop centred, the odd voxel comes off the end
                    cut: list[slice] = [slice(None)] * arr.ndim
                    cut[idx] = slice(diff // 2, arr.shape[idx] - diff // 2 - diff % 2)
                    arr = arr[tuple(cut)]
                else:  # pad centred, the odd voxel goes to the end
                    width = [(0, 0)] * arr.ndim
                    width[idx] = (diff // 2, diff // 2 + diff % 2)
                    arr = np.pad(arr, width, mode="constant", constant_values=pad_value)
            sample[entry] = arr
        return sample

    return apply


def _mask(mask_key: str, mask_value: Any, masking_value: Any, loop_axis: int | None, entries: Sequence[str]) -> Step:
    def apply(sample: Sample) -> Sample:
        if mask_key not in sample:
            raise ValueError(f'Mask: mask entry "{_name(mask_key)}" was not extracted')
        mask = _check_ndarray(sample[mask_key])
        for entry in entries:
            if entry not in sample:
                raise ValueError(ENTRY_NOT_EXTRACTED.format(_name(entry)))
            arr = _check_ndarray(sample[entry])
            if mask.shape == arr.shape:
                arr[mask == mask_value] = masking_value
            else:
                if loop_axis is None:
                    raise ValueError(
                        f"Mask: mask shape {mask.shape} differs from {bounded(entry)} shape {arr.shape}; "
                        "set loop_axis to repeat the mask along that axis"
                    )
                repeated = np.repeat(np.expand_dims(mask, loop_axis), arr.shape[loop_axis], axis=loop_axis)
                arr[repeated == mask_value] = masking_value
            sample[entry] = arr
        return sample

    return apply


def _compose(transforms: list[Transform]) -> Transform:
    def apply(sample: Sample, draw: Draw) -> Sample:
        for t in transforms:
            sample = t(sample, draw)
        return sample

    return Transform(apply)


def _labelled(name: str, transform: Callable[[Sample, Draw], Sample]) -> Transform:
    """Reports which transform failed, with numpy's own message."""

    def apply(sample: Sample, draw: Draw) -> Sample:
        try:
            return transform(sample, draw)
        except InvalidArgument:
            raise
        except (ValueError, TypeError, IndexError, OverflowError, np.exceptions.AxisError) as exc:
            raise InvalidArgument(f"{name}: {exc}") from exc

    return Transform(apply)


_VIEWS = frozenset({"permute", "squeeze", "un_squeeze", "reshape", "size_correction"})
"""Transforms that give views or new arrays and never write into the arrays they are given."""
_NEW_ARRAYS_UNLESS_LOOPED = frozenset({"intensity_normalization", "intensity_rescale"})
"""Transforms that compute new arrays, except with ``loop_axis``, where they write each slice back in place."""


def augments(msg: spec_pb2.Transform) -> bool:
    """Whether a transform spec holds a random transform (whose resampling costs milliseconds per sample)."""
    kind = msg.WhichOneof("transform")
    if kind == "compose":
        return any(augments(t) for t in msg.compose.transforms)
    return kind in AUGMENTATIONS


def writes_in_place(msg: spec_pb2.Transform) -> bool:
    """Whether a transform spec may write into the arrays of the sample it is given (Relabel, Mask, ClipPercentile,
    anything with ``loop_axis``). Samples for a transform that does not are extracted without private copies of the
    cached blocks: Permute, Squeeze, UnSqueeze, Reshape and SizeCorrection only make views or new arrays, and the
    random transforms only new arrays."""
    kind = msg.WhichOneof("transform")
    if kind == "compose":
        return any(writes_in_place(t) for t in msg.compose.transforms)
    if kind in _VIEWS or kind in AUGMENTATIONS:
        return False
    if kind in _NEW_ARRAYS_UNLESS_LOOPED:
        return getattr(msg, kind).HasField("loop_axis")
    return True


def compile_transform(msg: spec_pb2.Transform, field: str = "transform", max_bytes: int | None = None) -> Transform:
    """A transform spec compiled; ``max_bytes`` bounds what SizeCorrection may pad an entry to."""
    return _compile(msg, field, max_bytes, 1, itertools.count())


def _compile(
    msg: spec_pb2.Transform, field: str, max_bytes: int | None, depth: int, streams: Iterator[int]
) -> Transform:
    """``depth``: how deep ``msg`` lies in ComposeTransforms (refused beyond MAX_NESTING before going deeper);
    ``streams`` numbers the random transforms in chain order (each draws from its own generator)."""
    kind, sub, where = spec_choice(msg, "transform", field, depth, "ComposeTransform")
    entries = tuple(getattr(sub, "entries", ()))
    if kind == "compose":
        return _compose(
            [
                _compile(t, f"{where}.transforms[{i}]", max_bytes, depth + 1, streams)
                for i, t in enumerate(sub.transforms)
            ]
        )
    label = f"{where} (entries {bounded_list(entries, quote=False) or '-'})"
    if kind in AUGMENTATIONS:
        random_step = compile_augmentation(kind, sub, where, max_bytes)
        stream = next(streams)
        return _labelled(label, lambda sample, draw: random_step(sample, draw.generator(stream)))
    t: Step
    if kind == "permute":
        perm = tuple(int(p) for p in sub.permutation)
        if sorted(perm) != list(range(len(perm))):
            raise InvalidArgument(f"{where}.permutation: {bounded(perm)} is not a permutation of 0..{len(perm) - 1}")
        t = _entry_transform(lambda a, e: np.transpose(a, perm), entries)
    elif kind == "squeeze":
        axes = tuple(int(a) for a in sub.squeeze_axis)
        axis: Any = None if not axes else (axes[0] if len(axes) == 1 else axes)
        t = _entry_transform(lambda a, e: a.squeeze(axis), entries)
    elif kind == "un_squeeze":
        t = _entry_transform(lambda a, e: np.expand_dims(a, int(sub.axis)), entries)
    elif kind == "reshape":
        shapes = {s.entry: tuple(int(v) for v in s.shape) for s in sub.shapes}
        if not shapes:
            raise InvalidArgument(f"{where}.shapes: give at least one entry and its shape")
        t = _entry_transform(lambda a, e: np.reshape(a, shapes[e]), tuple(shapes))
    elif kind == "intensity_normalization":
        t = _entry_transform(_normalize, entries, _loop_axis(sub))
    elif kind == "intensity_rescale":
        lower = _scalar(sub.lower, f"{where}.lower")
        upper = _scalar(sub.upper, f"{where}.upper")
        t = _entry_transform(_rescale(lower, upper), entries, _loop_axis(sub))
    elif kind == "clip_percentile":
        upper = _scalar(sub.upper_percentile, f"{where}.upper_percentile")
        lower = _scalar(sub.lower_percentile, f"{where}.lower_percentile", default=100 - upper)
        for name, p in (("upper_percentile", upper), ("lower_percentile", lower)):
            if not 0 <= p <= 100:
                raise InvalidArgument(f"{where}.{name}: percentiles must lie in [0, 100], got {p}")
        t = _entry_transform(_clip(upper, lower), entries, _loop_axis(sub))
    elif kind == "relabel":
        changes = [
            (
                _scalar(c.new_label, f"{where}.label_changes[{i}].new_label"),
                _scalar(c.old_label, f"{where}.label_changes[{i}].old_label"),
            )
            for i, c in enumerate(sub.label_changes)
        ]
        t = _entry_transform(_relabel(changes), entries)
    elif kind == "size_correction":
        shape = [int(d.size) if d.HasField("size") else None for d in sub.shape]
        if any(s is not None and not 0 <= s <= MAX_SIZE for s in shape):
            raise InvalidArgument(
                f"{where}.shape: sizes must not be negative nor exceed {MAX_SIZE}, got {bounded_list(shape, 8)}"
            )
        t = _size_correction(shape, _scalar(sub.pad_value, f"{where}.pad_value", default=0), entries, max_bytes)
    elif kind == "mask":
        if not sub.mask_key:
            raise InvalidArgument(f"{where}.mask_key: name the sample entry that holds the mask")
        t = _mask(
            sub.mask_key,
            _scalar(sub.mask_value, f"{where}.mask_value", default=0),
            _scalar(sub.masking_value, f"{where}.masking_value", default=0.0),
            _loop_axis(sub),
            entries,
        )
    else:
        raise InvalidArgument(f"{field}: unknown transform {kind!r}")
    step = t
    return _labelled(label, lambda sample, draw: step(sample))
