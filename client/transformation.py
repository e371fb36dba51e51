"""Transforms with the names, defaults and meanings of ``pymia.data.transformation``.

They are specs: the server runs them after extraction. :class:`LambdaTransform` (and any other Python callable
taking and returning a sample dict) runs on the client after receipt, because the server never runs client code.
Client-side callables therefore come last: in a :class:`ComposeTransform`, everything from the first callable on
runs on the client, and a built-in transform after a callable is refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from patchwire.client import definition as defs
from patchwire.v1 import spec_pb2, tensor_pb2

__all__ = [
    "ClipPercentile",
    "ComposeTransform",
    "IntensityNormalization",
    "IntensityRescale",
    "LambdaTransform",
    "LoopEntryTransform",
    "Mask",
    "Permute",
    "Relabel",
    "Reshape",
    "SizeCorrection",
    "Squeeze",
    "Transform",
    "UnSqueeze",
]

ENTRY_NOT_EXTRACTED_ERR_MSG = 'Transform can not be applied because entry "{}" was not extracted'


def _scalar(value: Any) -> tensor_pb2.Scalar:
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, int | np.integer):
        return tensor_pb2.Scalar(int_value=int(value))
    if isinstance(value, float | np.floating):
        return tensor_pb2.Scalar(float_value=float(value))
    raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")


class Transform:
    """Base of the transforms. Built-in transforms are specs run by the server."""

    def _to_proto(self) -> spec_pb2.Transform:
        raise NotImplementedError

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} runs on the server; pass it to a datasource")


class ComposeTransform(Transform):
    def __init__(self, transforms: Iterable[Any]) -> None:
        self.transforms = list(transforms)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            compose=spec_pb2.ComposeTransform(transforms=[t._to_proto() for t in self.transforms])
        )


class LoopEntryTransform(Transform):
    """A transform applied to each of ``entries``, optionally one index of ``loop_axis`` at a time (in place)."""

    def __init__(self, loop_axis: int | None = None, entries: Sequence[str] = ()) -> None:
        self.loop_axis = loop_axis
        self.entries = tuple(entries)


class IntensityRescale(LoopEntryTransform):
    def __init__(
        self, lower: float, upper: float, loop_axis: int | None = None, entries: Sequence[str] = (defs.KEY_IMAGES,)
    ) -> None:
        super().__init__(loop_axis, entries)
        self.lower, self.upper = lower, upper

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            intensity_rescale=spec_pb2.IntensityRescale(
                lower=_scalar(self.lower), upper=_scalar(self.upper), loop_axis=self.loop_axis, entries=self.entries
            )
        )


class IntensityNormalization(LoopEntryTransform):
    def __init__(self, loop_axis: int | None = None, entries: Sequence[str] = (defs.KEY_IMAGES,)) -> None:
        super().__init__(loop_axis, entries)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            intensity_normalization=spec_pb2.IntensityNormalization(loop_axis=self.loop_axis, entries=self.entries)
        )


class ClipPercentile(LoopEntryTransform):
    def __init__(
        self,
        upper_percentile: float,
        lower_percentile: float | None = None,
        loop_axis: int | None = None,
        entries: Sequence[str] = (defs.KEY_IMAGES,),
    ) -> None:
        super().__init__(loop_axis, entries)
        self.upper_percentile = upper_percentile
        self.lower_percentile = 100 - upper_percentile if lower_percentile is None else lower_percentile

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            clip_percentile=spec_pb2.ClipPercentile(
                upper_percentile=_scalar(self.upper_percentile),
                lower_percentile=_scalar(self.lower_percentile),
                loop_axis=self.loop_axis,
                entries=self.entries,
            )
        )


class Relabel(LoopEntryTransform):
    """``label_changes`` maps new label -> old label, applied in order (so {1: 3, 3: 1} is not a swap)."""

    def __init__(self, label_changes: dict[int, int], entries: Sequence[str] = (defs.KEY_LABELS,)) -> None:
        super().__init__(None, entries)
        self.label_changes = dict(label_changes)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            relabel=spec_pb2.Relabel(
                label_changes=[
                    spec_pb2.LabelChange(new_label=_scalar(n), old_label=_scalar(o))
                    for n, o in self.label_changes.items()
                ],
                entries=self.entries,
            )
        )


class Reshape(LoopEntryTransform):
    def __init__(self, shapes: dict[str, Sequence[int]]) -> None:
        super().__init__(None, tuple(shapes))
        self.shapes = {k: tuple(v) for k, v in shapes.items()}

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            reshape=spec_pb2.Reshape(shapes=[spec_pb2.ReshapeEntry(entry=k, shape=v) for k, v in self.shapes.items()])
        )


class Permute(LoopEntryTransform):
    def __init__(self, permutation: Sequence[int], entries: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS)) -> None:
        super().__init__(None, entries)
        self.permutation = tuple(permutation)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(permute=spec_pb2.Permute(permutation=self.permutation, entries=self.entries))


class Squeeze(LoopEntryTransform):
    def __init__(
        self,
        entries: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS),
        squeeze_axis: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(None, entries)
        self.squeeze_axis = squeeze_axis

    def _to_proto(self) -> spec_pb2.Transform:
        axes: Sequence[int] = ()
        if self.squeeze_axis is not None:
            axes = (self.squeeze_axis,) if isinstance(self.squeeze_axis, int) else tuple(self.squeeze_axis)
            if not axes:
                raise ValueError("Squeeze: squeeze_axis=() squeezes nothing; use None to squeeze every length-1 axis")
        return spec_pb2.Transform(squeeze=spec_pb2.Squeeze(entries=self.entries, squeeze_axis=axes))


class UnSqueeze(LoopEntryTransform):
    def __init__(self, axis: int = -1, entries: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS)) -> None:
        super().__init__(None, entries)
        self.axis = axis

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(un_squeeze=spec_pb2.UnSqueeze(axis=self.axis, entries=self.entries))


class SizeCorrection(Transform):
    """Crops or zero-pads (``pad_value``) the leading axes to ``shape``, centred; None keeps an axis."""

    def __init__(
        self,
        shape: Sequence[int | None],
        pad_value: float = 0,
        entries: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS),
    ) -> None:
        self.shape = tuple(shape)
        self.pad_value = pad_value
        self.entries = tuple(entries)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            size_correction=spec_pb2.SizeCorrection(
                shape=[spec_pb2.SizeCorrectionDim(size=s) for s in self.shape],
                pad_value=_scalar(self.pad_value),
                entries=self.entries,
            )
        )


class Mask(Transform):
    """Sets ``entries`` to ``masking_value`` where the sample's ``mask_key`` array equals ``mask_value``."""

    def __init__(
        self,
        mask_key: str,
        mask_value: int = 0,
        masking_value: float = 0.0,
        loop_axis: int | None = None,
        entries: Sequence[str] = (defs.KEY_IMAGES, defs.KEY_LABELS),
    ) -> None:
        self.mask_key = mask_key
        self.mask_value = mask_value
        self.masking_value = masking_value
        self.loop_axis = loop_axis
        self.entries = tuple(entries)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            mask=spec_pb2.Mask(
                mask_key=self.mask_key,
                mask_value=_scalar(self.mask_value),
                masking_value=_scalar(self.masking_value),
                loop_axis=self.loop_axis,
                entries=self.entries,
            )
        )


class LambdaTransform(LoopEntryTransform):
    """``lambda_fn(array)`` on each of ``entries``; runs on the client after receipt."""

    def __init__(
        self,
        lambda_fn: Callable[[np.ndarray], np.ndarray],
        loop_axis: int | None = None,
        entries: Sequence[str] = (defs.KEY_IMAGES,),
    ) -> None:
        super().__init__(loop_axis, entries)
        self.lambda_fn = lambda_fn

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for entry in self.entries:
            if entry not in sample:
                raise ValueError(ENTRY_NOT_EXTRACTED_ERR_MSG.format(entry))
            arr = sample[entry]
            if not isinstance(arr, np.ndarray):
                raise ValueError("entry must be 'ndarray'")
            if self.loop_axis is None:
                arr = self.lambda_fn(arr)
            else:
                slicing: list[Any] = [slice(None)] * arr.ndim
                for i in range(arr.shape[self.loop_axis]):
                    slicing[self.loop_axis] = i
                    arr[tuple(slicing)] = self.lambda_fn(arr[tuple(slicing)])
            sample[entry] = arr
        return sample


def _flatten(transform: Any) -> list[Any]:
    if isinstance(transform, ComposeTransform):
        return [t for sub in transform.transforms for t in _flatten(sub)]
    return [transform]


def split_transform(transform: Any) -> tuple[spec_pb2.Transform | None, list[Callable[[dict[str, Any]], Any]]]:
    """Splits a transform into the server's part (a spec) and the client's part (callables run after receipt)."""
    if transform is None:
        return None, []
    steps = _flatten(transform)
    server: list[Transform] = []
    client: list[Callable[[dict[str, Any]], Any]] = []
    for i, step in enumerate(steps):
        is_spec = isinstance(step, Transform) and not isinstance(step, LambdaTransform)
        if is_spec and not client:
            server.append(step)
        elif is_spec:
            raise ValueError(
                f"transform step {i} ({type(step).__name__}) follows a client-side callable: built-in "
                "transforms run on the server before any client-side callable; move the callables "
                "(LambdaTransform, custom functions) to the end"
            )
        elif callable(step):
            client.append(step)
        else:
            raise TypeError(f"transform step {i}: {step!r} is neither a patchwire transform nor callable")
    if not server:
        return None, client
    spec = server[0]._to_proto() if len(server) == 1 else ComposeTransform(server)._to_proto()
    return spec, client
