"""pymia's indexing strategies, computed lazily.

An index expression is what pymia's ``IndexExpression.expression`` holds: the bare ``slice(None)`` for a whole
array (EmptyIndexing), or a tuple of ints and slices. Strategies give the number of samples of a subject and the
expression of its k-th sample without materialising a list (pymia keeps one Python object per voxel for
VoxelWiseIndexing); the order is exactly pymia's.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import numpy as np

from patchwire.service._errors import InvalidArgument, bounded
from patchwire.v1 import spec_pb2
from patchwire.wire.indexexpression import WHOLE, Expression

__all__ = [
    "WHOLE",
    "Expression",
    "Indexing",
    "compile_indexing",
]


class Indexing(abc.ABC):
    """A compiled indexing strategy."""

    @abc.abstractmethod
    def validate(self, shape: Sequence[int], where: str) -> None:
        """Raises InvalidArgument when the strategy cannot index an image of ``shape``."""

    @abc.abstractmethod
    def count(self, shape: Sequence[int]) -> int:
        """Number of samples of a subject whose images have ``shape``."""

    @abc.abstractmethod
    def expression(self, shape: Sequence[int], k: int) -> Expression:
        """Index expression of the k-th sample of such a subject."""


class _Empty(Indexing):
    def validate(self, shape: Sequence[int], where: str) -> None:
        return None

    def count(self, shape: Sequence[int]) -> int:
        return 1

    def expression(self, shape: Sequence[int], k: int) -> Expression:
        return WHOLE


class _Slice(Indexing):
    def __init__(self, axes: Sequence[int]) -> None:
        if not axes:
            raise InvalidArgument("indexing_strategy.slice.slice_axis: give at least one axis")
        for a in axes:
            if a < 0:
                raise InvalidArgument(
                    f"indexing_strategy.slice.slice_axis: axis {a} is negative; "
                    "pymia's SliceIndexing takes axes counted from 0"
                )
        self.axes = tuple(int(a) for a in axes)

    def validate(self, shape: Sequence[int], where: str) -> None:
        for a in self.axes:
            if a >= len(shape):
                raise InvalidArgument(
                    f"indexing_strategy.slice.slice_axis: axis {a} does not exist in {where} "
                    f"with image shape {tuple(shape)} ({len(shape)} axes)"
                )

    def count(self, shape: Sequence[int]) -> int:
        return sum(int(shape[a]) for a in self.axes)

    def expression(self, shape: Sequence[int], k: int) -> Expression:
        for a in self.axes:
            if k < shape[a]:
                return (slice(None),) * a + (k,)
            k -= int(shape[a])
        raise IndexError(k)


class _PatchWise(Indexing):
    """pymia's patch grid, or a sliding-window grid when ``stride`` is given.

    Without a stride the grid is pymia's: non-overlapping patches at multiples of the patch size, incomplete border
    patches dropped (``ignore_incomplete``) or kept with their slices running past the end (h5py clamps them).

    With a stride, the starts along an axis of size ``dim`` are ``0, s, 2s, ...`` while ``start + patch <= dim``,
    plus a border patch at ``dim - patch`` when the last start does not reach the end, so every voxel is covered
    by full-size patches (MONAI's and nnU-Net's sliding window). An axis shorter than its patch has one patch at 0
    that h5py clamps, kept only when ``ignore_incomplete`` is false; an empty axis has none. Either way samples are
    ordered C-style over the grid (first axis slowest) and computed from the sample number, never listed.
    """

    def __init__(
        self, patch_shape: Sequence[int], ignore_incomplete: bool, stride: Sequence[int] | None = None
    ) -> None:
        if not patch_shape:
            raise InvalidArgument("indexing_strategy.patch_wise.patch_shape: give at least one dimension")
        if any(p <= 0 for p in patch_shape):
            raise InvalidArgument(
                f"indexing_strategy.patch_wise.patch_shape: sizes must be positive, got {bounded(tuple(patch_shape))}"
            )
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.ignore_incomplete = ignore_incomplete
        self.stride: tuple[int, ...] | None = None
        if stride:
            if len(stride) != len(self.patch_shape):
                raise InvalidArgument(
                    f"indexing_strategy.patch_wise.stride: {len(stride)} values for "
                    f"{len(self.patch_shape)} patch axes; give one stride per axis of patch_shape "
                    f"{bounded(self.patch_shape)} (or none for non-overlapping patches)"
                )
            for axis, (s, p) in enumerate(zip(stride, self.patch_shape, strict=True)):
                if not 1 <= s <= p:
                    raise InvalidArgument(
                        f"indexing_strategy.patch_wise.stride: stride {s} on axis {axis} must lie in 1..{p} "
                        f"(the patch size), got stride {bounded(tuple(stride))} "
                        f"for patch_shape {bounded(self.patch_shape)}"
                    )
            self.stride = tuple(int(s) for s in stride)

    def validate(self, shape: Sequence[int], where: str) -> None:
        if len(self.patch_shape) > len(shape):
            raise InvalidArgument(
                f"indexing_strategy.patch_wise.patch_shape: {len(self.patch_shape)} dimensions "
                f"but {where} has image shape {tuple(shape)}"
            )

    def _grid(self, shape: Sequence[int]) -> tuple[int, ...]:
        if self.stride is not None:
            return tuple(
                self._axis_count(int(d), p, s) for d, p, s in zip(shape, self.patch_shape, self.stride, strict=False)
            )
        rounding = math.floor if self.ignore_incomplete else math.ceil
        return tuple(int(rounding(int(d) / p)) for d, p in zip(shape, self.patch_shape, strict=False))

    def _axis_count(self, dim: int, patch: int, stride: int) -> int:
        """Number of sliding-window starts along an axis of size ``dim``."""
        if dim <= 0:
            return 0
        if dim < patch:
            return 0 if self.ignore_incomplete else 1
        regular = (dim - patch) // stride + 1
        return regular + (1 if (regular - 1) * stride + patch < dim else 0)

    @staticmethod
    def _axis_start(dim: int, patch: int, stride: int, i: int) -> int:
        """Start of the i-th sliding-window patch along an axis of size ``dim`` (i < its count)."""
        if dim < patch:
            return 0
        return min(i * stride, dim - patch)

    def count(self, shape: Sequence[int]) -> int:
        return math.prod(self._grid(shape))

    def expression(self, shape: Sequence[int], k: int) -> Expression:
        cell = np.unravel_index(k, self._grid(shape))
        if self.stride is None:
            return tuple(slice(int(c) * p, (int(c) + 1) * p) for c, p in zip(cell, self.patch_shape, strict=True))
        starts = (
            self._axis_start(int(d), p, s, int(c))
            for d, p, s, c in zip(shape, self.patch_shape, self.stride, cell, strict=False)
        )
        return tuple(slice(b, b + p) for b, p in zip(starts, self.patch_shape, strict=True))


class _VoxelWise(Indexing):
    def __init__(self, image_dimension: int) -> None:
        if image_dimension <= 0:
            raise InvalidArgument(
                f"indexing_strategy.voxel_wise.image_dimension: must be positive, got {image_dimension}"
            )
        self.image_dimension = int(image_dimension)

    def validate(self, shape: Sequence[int], where: str) -> None:
        if self.image_dimension > len(shape):
            raise InvalidArgument(
                f"indexing_strategy.voxel_wise.image_dimension: {self.image_dimension} exceeds "
                f"the {len(shape)} axes of {where} (image shape {tuple(shape)})"
            )

    def count(self, shape: Sequence[int]) -> int:
        return math.prod(int(d) for d in shape[: self.image_dimension])

    def expression(self, shape: Sequence[int], k: int) -> Expression:
        return tuple(int(i) for i in np.unravel_index(k, tuple(shape[: self.image_dimension])))


def compile_indexing(msg: spec_pb2.IndexingStrategy | None) -> Indexing:
    if msg is None:
        return _Empty()
    kind = msg.WhichOneof("strategy")
    if kind is None or kind == "empty":
        return _Empty()
    if kind == "slice":
        return _Slice(list(msg.slice.slice_axis))
    if kind == "patch_wise":
        return _PatchWise(
            list(msg.patch_wise.patch_shape), msg.patch_wise.ignore_incomplete, list(msg.patch_wise.stride)
        )
    if kind == "voxel_wise":
        return _VoxelWise(msg.voxel_wise.image_dimension)
    raise InvalidArgument(f"indexing_strategy: unknown strategy {kind!r}")
