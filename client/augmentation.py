"""Random transforms: pymia's ``pymia.data.augmentation`` (same names, parameters and defaults) and the ones TorchIO
and MONAI users reach for first.

::

    from patchwire.client import augmentation as aug, transformation as tfm

    transform = tfm.ComposeTransform([
        aug.RandomFlip(axes=(0, 1, 2)),
        aug.RandomAffine(scales=(0.9, 1.1), degrees=10),
        aug.RandomGamma(),
    ])
    ds = client.datasource("brains", indexing, extractor, transform)

Like every transform of :mod:`patchwire.client.transformation`, these are specs: their parameters travel as
protobuf and the server runs them after extraction, so augmented samples cost the trainer no CPU. Their randomness
is the server's: a sample's draws come from a generator seeded by (seed, epoch, the sample's position in the epoch,
the transform's place in the chain) only, the seed and epoch a stream or ``get_samples`` call names. An augmented
epoch is therefore the same, byte for byte, whatever the number of DataLoader workers, ranks or replicas, and a
resumed epoch gives what the interrupted one would have.

Where they differ from pymia 0.3.4:

- No global random state: ``np.random.seed`` changes nothing; pass ``seed`` and ``epoch`` instead.
- :class:`RandomCrop` may draw every anchor, the last one included (pymia's ``randint(0, size - crop)`` never crops
  the last voxels and fails on a crop of an axis's whole size).
- :class:`RandomRotation90` refuses a plane that is not square (pymia warns and changes the sample's shape).
- A missing entry is refused whatever the ``p`` draw (pymia checks only when it transforms).
- :class:`RandomElasticDeformation` computes SimpleITK's B-spline displacement field with numpy and resamples with
  scipy (``interpolators`` take SimpleITK's codes or "nearest", "linear", "bspline"); integer and bool entries are
  always resampled nearest-neighbour, whatever their interpolator. ``spatial_rank`` names the leading axes; the
  others (channels) are deformed alike.

Spatial transforms move all their entries together, so images and label maps stay aligned. Intensity transforms
(:class:`RandomGamma`, :class:`RandomNoise`, :class:`RandomBiasField`, :class:`RandomIntensityScaleShift`) only take
floating entries.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from patchwire.client import definition as defs
from patchwire.client.transformation import Transform
from patchwire.v1 import spec_pb2

__all__ = [
    "RandomAffine",
    "RandomBiasField",
    "RandomCrop",
    "RandomElastic",
    "RandomElasticDeformation",
    "RandomFlip",
    "RandomGamma",
    "RandomIntensityScaleShift",
    "RandomMirror",
    "RandomNoise",
    "RandomRotation90",
    "RandomShift",
    "RandomTransform",
]

_SPATIAL = (defs.KEY_IMAGES, defs.KEY_LABELS)
_INTENSITY = (defs.KEY_IMAGES,)

_INTERPOLATIONS: dict[str | int, spec_pb2.Interpolation.ValueType] = {
    "nearest": spec_pb2.INTERPOLATION_NEAREST,
    "linear": spec_pb2.INTERPOLATION_LINEAR,
    "bspline": spec_pb2.INTERPOLATION_BSPLINE,
    # SimpleITK's sitkNearestNeighbor, sitkLinear, sitkBSpline (3 before SimpleITK 2, 23 since)
    1: spec_pb2.INTERPOLATION_NEAREST,
    2: spec_pb2.INTERPOLATION_LINEAR,
    3: spec_pb2.INTERPOLATION_BSPLINE,
    23: spec_pb2.INTERPOLATION_BSPLINE,
}


def _interpolation(value: str | int) -> spec_pb2.Interpolation.ValueType:
    key = value.lower() if isinstance(value, str) else int(value)
    if key not in _INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {value!r}: use 'nearest', 'linear', 'bspline' or SimpleITK's "
            "sitkNearestNeighbor, sitkLinear, sitkBSpline"
        )
    return _INTERPOLATIONS[key]


def _probability(value: float, name: str = "p") -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _tuple(value: int | float | Sequence[Any] | None) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, int | float | numbers.Number):
        return (value,)
    return tuple(value)


def _axes(value: int | Sequence[int] | None) -> tuple[int, ...]:
    return tuple(int(a) for a in _tuple(value))


def _range(low: float, high: float, name: str) -> spec_pb2.Range:
    if not low <= high:
        raise ValueError(f"{name}: low ({low}) must not exceed high ({high})")
    return spec_pb2.Range(low=float(low), high=float(high))


def _ranges(value: float | Sequence[float], name: str, around: float = 0.0) -> list[spec_pb2.Range]:
    """TorchIO's parameter forms: x is (around - x, around + x); (a, b) one range for every axis; (a0, b0, a1, b1,
    ...) one range per axis. A range of one value ``around`` (nothing changes) is left out."""
    values = _tuple(value)
    if len(values) == 1:
        x = float(values[0])
        if x < 0:
            raise ValueError(f"{name}: a single value must not be negative, got {x}")
        pairs = [(around - x, around + x)]
    elif len(values) in (2, 4, 6):
        pairs = [(float(values[i]), float(values[i + 1])) for i in range(0, len(values), 2)]
    else:
        raise ValueError(f"{name}: give x, (low, high) or (low, high) per axis, got {len(values)} values")
    if all(low == high == around for low, high in pairs):
        return []
    return [_range(low, high, name) for low, high in pairs]


def _one_range(value: float | Sequence[float], name: str, low_default: float | None = None) -> spec_pb2.Range:
    """x is (-x, x), or (low_default, x) when given; (a, b) is itself."""
    values = _tuple(value)
    if len(values) == 1:
        x = float(values[0])
        return _range(-abs(x) if low_default is None else low_default, abs(x), name)
    if len(values) == 2:
        return _range(float(values[0]), float(values[1]), name)
    raise ValueError(f"{name}: give x or (low, high), got {len(values)} values")


class RandomTransform(Transform):
    """Base of the random transforms: ``p`` is the probability that a sample is transformed."""

    def __init__(self, p: float, entries: Sequence[str]) -> None:
        self.p = _probability(p)
        self.entries = tuple(entries)

    def _to_proto(self) -> spec_pb2.Transform:
        raise NotImplementedError


# -- pymia's ----------------------------------------------------------------------------------------------------------


def _per_axis(values: Any, axis: int | Sequence[int] | None, name: str) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    """pymia's (values, axis) convention: the axes and values left once the axes whose value is None are dropped."""
    given = _tuple(values)
    axes = tuple(range(len(given))) if axis is None else _axes(axis)
    if len(axes) != len(given):
        raise ValueError(f"If specified, the axis parameter must be of the same length as the {name}")
    kept = [(a, v) for a, v in zip(axes, given, strict=True) if v is not None]
    return tuple(a for a, _ in kept), tuple(v for _, v in kept)


class RandomCrop(RandomTransform):
    """Crops ``axis`` to ``shape`` at a random anchor, the same for every entry. ``None`` in ``shape`` leaves an axis
    as it is; ``axis`` (default 0, 1, ...) has one axis per value of ``shape``."""

    def __init__(
        self,
        shape: int | Sequence[int | None],
        axis: int | Sequence[int] | None = None,
        p: float = 1.0,
        entries: Sequence[str] = _SPATIAL,
    ) -> None:
        super().__init__(p, entries)
        self.axis, kept = _per_axis(shape, axis, "shape")
        self.shape = tuple(int(s) for s in kept)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_crop=spec_pb2.RandomCrop(shape=self.shape, axis=self.axis, p=self.p, entries=self.entries)
        )


class RandomElasticDeformation(RandomTransform):
    """pymia's elastic deformation: a cubic B-spline displacement field over the first ``spatial_rank`` axes, with
    ``num_control_points`` grid cells per axis (at least 2) and control-point displacements ~ N(0,
    ``deformation_sigma``) voxels (sigma at least 1); ``interpolators`` has one per entry."""

    def __init__(
        self,
        num_control_points: int = 4,
        deformation_sigma: float = 5.0,
        interpolators: Sequence[str | int] = ("bspline", "nearest"),
        spatial_rank: int = 2,
        fill_value: float = 0.0,
        p: float = 0.5,
        entries: Sequence[str] = _SPATIAL,
    ) -> None:
        super().__init__(p, entries)
        if len(interpolators) != len(self.entries):
            raise ValueError("interpolators must have the same length as entries")
        self.num_control_points = max(int(num_control_points), 2)  # pymia's minimum
        self.deformation_sigma = max(float(deformation_sigma), 1.0)  # pymia's minimum
        self.interpolators = tuple(_interpolation(i) for i in interpolators)
        if spatial_rank < 1:
            raise ValueError(f"spatial_rank must be at least 1, got {spatial_rank}")
        self.spatial_rank = int(spatial_rank)
        self.fill_value = float(fill_value)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_elastic_deformation=spec_pb2.RandomElasticDeformation(
                num_control_points=self.num_control_points,
                deformation_sigma=self.deformation_sigma,
                interpolators=self.interpolators,
                spatial_axes=range(self.spatial_rank),
                fill_value=self.fill_value,
                p=self.p,
                entries=self.entries,
            )
        )


class RandomMirror(RandomTransform):
    """Flips along ``axis``."""

    def __init__(self, axis: int = -2, p: float = 1.0, entries: Sequence[str] = _SPATIAL) -> None:
        super().__init__(p, entries)
        self.axis = int(axis)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(random_mirror=spec_pb2.RandomMirror(axis=self.axis, p=self.p, entries=self.entries))


class RandomRotation90(RandomTransform):
    """Rotates by 90, 180 or 270 degrees (equally likely) in the plane of ``axes`` (two axes of equal size)."""

    def __init__(self, axes: Sequence[int] = (-3, -2), p: float = 1.0, entries: Sequence[str] = _SPATIAL) -> None:
        super().__init__(p, entries)
        if len(axes) != 2:
            raise ValueError("axes must be of length two")
        self.axes = _axes(axes)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_rotation90=spec_pb2.RandomRotation90(axes=self.axes, p=self.p, entries=self.entries)
        )


class RandomShift(RandomTransform):
    """Rolls each of ``axis`` by an integer drawn from [-m, m), m = int(shift * size); ``None`` in ``shift`` leaves
    an axis as it is; ``axis`` (default 0, 1, ...) has one axis per value of ``shift``."""

    def __init__(
        self,
        shift: float | Sequence[float | None],
        axis: int | Sequence[int] | None = None,
        p: float = 1.0,
        entries: Sequence[str] = _SPATIAL,
    ) -> None:
        super().__init__(p, entries)
        self.axis, kept = _per_axis(shift, axis, "shift")
        self.shift = tuple(float(s) for s in kept)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_shift=spec_pb2.RandomShift(shift=self.shift, axis=self.axis, p=self.p, entries=self.entries)
        )


# -- TorchIO's and MONAI's --------------------------------------------------------------------------------------------


class RandomFlip(RandomTransform):
    """Flips each of ``axes`` (default: every axis but the last, the channels) with probability
    ``flip_probability`` (TorchIO RandomFlip, MONAI RandFlip)."""

    def __init__(
        self,
        axes: int | Sequence[int] | None = None,
        flip_probability: float = 0.5,
        p: float = 1.0,
        entries: Sequence[str] = _SPATIAL,
    ) -> None:
        super().__init__(p, entries)
        self.axes = _axes(axes)
        self.flip_probability = _probability(flip_probability, "flip_probability")

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_flip=spec_pb2.RandomFlip(
                axes=self.axes, flip_probability=self.flip_probability, p=self.p, entries=self.entries
            )
        )


class RandomAffine(RandomTransform):
    """Scales, rotates (degrees) and translates (voxels) about the centre, each drawn per spatial axis (TorchIO
    RandomAffine, MONAI RandAffine). Each parameter takes TorchIO's forms: x (scales: U(1 - x, 1 + x); degrees and
    translation: U(-x, x)), (low, high) for every axis, or (low0, high0, low1, high1, ...) per axis. In 2-D there is
    one angle, in 3-D one about each axis. ``spatial_axes`` default to every axis but the last; label maps are
    resampled nearest-neighbour, floating entries with ``interpolation``; voxels from outside get ``fill_value``."""

    def __init__(
        self,
        scales: float | Sequence[float] = (0.9, 1.1),
        degrees: float | Sequence[float] = 10,
        translation: float | Sequence[float] = 0,
        interpolation: str | int = "linear",
        spatial_axes: Sequence[int] | None = None,
        fill_value: float = 0.0,
        p: float = 1.0,
        entries: Sequence[str] = _SPATIAL,
    ) -> None:
        super().__init__(p, entries)
        self.scales = _ranges(scales, "scales", around=1.0)
        if any(r.low <= 0 for r in self.scales):
            raise ValueError("scales must be positive")
        self.degrees = _ranges(degrees, "degrees")
        self.translation = _ranges(translation, "translation")
        self.interpolation = _interpolation(interpolation)
        self.spatial_axes = _axes(spatial_axes)
        self.fill_value = float(fill_value)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_affine=spec_pb2.RandomAffine(
                scales=self.scales,
                degrees=self.degrees,
                translation=self.translation,
                interpolation=self.interpolation,
                spatial_axes=self.spatial_axes,
                fill_value=self.fill_value,
                p=self.p,
                entries=self.entries,
            )
        )


class RandomElastic(RandomTransform):
    """TorchIO's RandomElasticDeformation: a grid of ``num_control_points`` per spatial axis (at least 4) whose
    inner points move by up to ``max_displacement`` voxels along each axis (uniformly; the two outer layers stay
    still), smoothed by cubic B-spline interpolation."""

    def __init__(
        self,
        num_control_points: int = 7,
        max_displacement: float = 7.5,
        interpolation: str | int = "linear",
        spatial_axes: Sequence[int] | None = None,
        fill_value: float = 0.0,
        p: float = 1.0,
        entries: Sequence[str] = _SPATIAL,
    ) -> None:
        super().__init__(p, entries)
        if num_control_points < 4:
            raise ValueError(f"num_control_points must be at least 4, got {num_control_points}")
        if not max_displacement >= 0:
            raise ValueError(f"max_displacement must not be negative, got {max_displacement}")
        self.num_control_points = int(num_control_points)
        self.max_displacement = float(max_displacement)
        self.interpolation = _interpolation(interpolation)
        self.spatial_axes = _axes(spatial_axes)
        self.fill_value = float(fill_value)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_elastic=spec_pb2.RandomElastic(
                num_control_points=self.num_control_points,
                max_displacement=self.max_displacement,
                interpolation=self.interpolation,
                spatial_axes=self.spatial_axes,
                fill_value=self.fill_value,
                p=self.p,
                entries=self.entries,
            )
        )


class RandomGamma(RandomTransform):
    """x -> sign(x) * |x| ** exp(g), g ~ U(``log_gamma``) (x: U(-x, x)); TorchIO RandomGamma."""

    def __init__(
        self, log_gamma: float | Sequence[float] = (-0.3, 0.3), p: float = 1.0, entries: Sequence[str] = _INTENSITY
    ) -> None:
        super().__init__(p, entries)
        self.log_gamma = _one_range(log_gamma, "log_gamma")

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_gamma=spec_pb2.RandomGamma(log_gamma=self.log_gamma, p=self.p, entries=self.entries)
        )


class RandomNoise(RandomTransform):
    """Adds N(``mean``, s) noise, s ~ U(``std``) (x: U(0, x)); TorchIO RandomNoise, MONAI RandGaussianNoise."""

    def __init__(
        self,
        mean: float = 0.0,
        std: float | Sequence[float] = (0.0, 0.25),
        p: float = 1.0,
        entries: Sequence[str] = _INTENSITY,
    ) -> None:
        super().__init__(p, entries)
        self.mean = float(mean)
        self.std = _one_range(std, "std", low_default=0.0)
        if self.std.low < 0:
            raise ValueError(f"std must not be negative, got {self.std.low}")

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_noise=spec_pb2.RandomNoise(mean=self.mean, std=self.std, p=self.p, entries=self.entries)
        )


class RandomBiasField(RandomTransform):
    """Multiplies by exp of a polynomial of ``order`` over the spatial axes (each running over [-1, 1]), with
    coefficients ~ U(-``coefficients``, ``coefficients``); TorchIO RandomBiasField."""

    def __init__(
        self,
        coefficients: float = 0.5,
        order: int = 3,
        spatial_axes: Sequence[int] | None = None,
        p: float = 1.0,
        entries: Sequence[str] = _INTENSITY,
    ) -> None:
        super().__init__(p, entries)
        if not (coefficients >= 0 and math.isfinite(coefficients)):
            raise ValueError(f"coefficients must be a non-negative number, got {coefficients}")
        if order < 0:
            raise ValueError(f"order must not be negative, got {order}")
        self.coefficients = float(coefficients)
        self.order = int(order)
        self.spatial_axes = _axes(spatial_axes)

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_bias_field=spec_pb2.RandomBiasField(
                coefficients=self.coefficients,
                order=self.order,
                spatial_axes=self.spatial_axes,
                p=self.p,
                entries=self.entries,
            )
        )


class RandomIntensityScaleShift(RandomTransform):
    """x -> x * (1 + s) + o, s ~ U(``scale``), o ~ U(``shift``) (x: U(-x, x)); MONAI RandScaleIntensity and
    RandShiftIntensity in one."""

    def __init__(
        self,
        scale: float | Sequence[float] = 0.1,
        shift: float | Sequence[float] = 0.1,
        p: float = 1.0,
        entries: Sequence[str] = _INTENSITY,
    ) -> None:
        super().__init__(p, entries)
        self.scale = _one_range(scale, "scale")
        self.shift = _one_range(shift, "shift")

    def _to_proto(self) -> spec_pb2.Transform:
        return spec_pb2.Transform(
            random_intensity_scale_shift=spec_pb2.RandomIntensityScaleShift(
                scale=self.scale, shift=self.shift, p=self.p, entries=self.entries
            )
        )
