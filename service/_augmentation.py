"""Random transforms (pymia.data.augmentation and the TorchIO/MONAI first choices), interpreted from their specs.

A compiled random transform is a :data:`RandomStep`, ``step(sample, rng) -> sample``, that draws from the generator it
is given and from nothing else (no global state): the transform chain hands each random transform a generator of its
own seeded by (seed, epoch, sample position, place in the chain), so an augmented epoch is the same whatever the
order, batching, workers or ranks that produce it.

Every step first checks that its entries were extracted, then draws ``u ~ U[0, 1)`` and leaves the sample as it is
when ``u >= p`` (pymia's ``if self.p < np.random.random(): return sample`` with the tie on the other side, so that
p = 0 never transforms and p = 1 always does), then draws its parameters in the order its function below names. A
step never writes into the arrays it is given (they may view the server's cache): what it changes, it returns as new
arrays, each in its entry's dtype, in a new sample dict.

Spatial transforms move all their entries together; integer and bool arrays (label maps) are always resampled
nearest-neighbour, floating ones with the spec's interpolation (computed in float32 for float32 and float16 arrays).
Output voxels that map outside the input's voxels take fill_value (scipy's ``grid-constant`` mode, under which
nearest-neighbour resampling gives exactly what SimpleITK, pymia's and TorchIO's resampler, gives).
Intensity transforms refuse integer and bool entries (a label map augmented by mistake fails loudly). Everything a
spec sets is checked when it is compiled, with bounds on whatever sizes the server would allocate from (control
points, polynomial order, crop sizes); what depends on the sample (axes, sizes) is checked when it runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from patchwire.service._errors import MAX_ECHO_CHARS, InvalidArgument, bounded, bounded_list
from patchwire.service._limits import check_sample_bytes
from patchwire.v1 import spec_pb2

__all__ = ["AUGMENTATIONS", "RandomStep", "compile_augmentation"]

Sample = dict[str, Any]
RandomStep = Callable[[Sample, np.random.Generator], Sample]
Body = Callable[[list[np.ndarray], np.random.Generator], list[np.ndarray]]
"""A random transform's work on its entries' arrays (after the ``p`` draw): new arrays, in the same order."""
Apply = Callable[[np.ndarray, np.ndarray, int, float], None]
"""Resamples one channel: ``apply(channel, output, order, fill)``."""

MAX_AXES = 32
"""Axes a spec may name are in [-MAX_AXES, MAX_AXES) (numpy arrays have at most 64; samples a handful)."""
MAX_SPATIAL_AXES = 3
"""Most spatial axes of the transforms that build a field over them (affine, elastic, bias field)."""
MAX_SIZE = 1 << 16
"""Largest crop size (more than any image has)."""
MAX_CONTROL_POINTS = 64
"""Most control points per axis of an elastic transform's grid (its coarse grid holds up to (64 + 3) ** 3 * 3
values)."""
MAX_BIAS_ORDER = 8
"""Highest polynomial order of a bias field (C(8 + 3, 3) = 165 coefficients in 3-D)."""
MAX_DISPLACEMENT = 1e4
"""Largest elastic displacement (sigma or maximum) and translation, in voxels."""
MAX_DEGREES = 360.0
MAX_SCALE = 100.0
"""Affine scales lie in (0, MAX_SCALE]."""
MAX_LOG_GAMMA = 10.0
MAX_INTENSITY = 1e6
"""Bound of noise means and standard deviations, intensity scales and shifts, and fill values."""
MAX_BIAS_COEFFICIENT = 10.0
ENTRY_NOT_EXTRACTED = 'Transform can not be applied because entry "{}" was not extracted'

_ORDERS: dict[int, int] = {
    spec_pb2.INTERPOLATION_UNSPECIFIED: 1,
    spec_pb2.INTERPOLATION_NEAREST: 0,
    spec_pb2.INTERPOLATION_LINEAR: 1,
    spec_pb2.INTERPOLATION_BSPLINE: 3,
}
"""Spline order of scipy.ndimage per interpolation."""


# -- checks of a spec's fields -----------------------------------------------------------------------------------------


def _name(entry: str) -> str:
    return entry if len(entry) <= MAX_ECHO_CHARS else bounded(entry)


def _p(sub: Any, where: str, default: float = 1.0) -> float:
    return _probability(float(sub.p) if sub.HasField("p") else default, f"{where}.p")


def _probability(value: float, field: str) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InvalidArgument(f"{field}: a probability must lie in [0, 1], got {value}")
    return value


def _number(value: float, field: str, low: float, high: float) -> float:
    value = float(value)
    if not low <= value <= high:  # also refuses NaN and infinities
        raise InvalidArgument(f"{field}: must lie in [{low:g}, {high:g}], got {value}")
    return value


def _range(msg: spec_pb2.Range, field: str, low: float, high: float) -> tuple[float, float]:
    lo = _number(msg.low, f"{field}.low", low, high)
    hi = _number(msg.high, f"{field}.high", low, high)
    if lo > hi:
        raise InvalidArgument(f"{field}: low ({lo}) must not exceed high ({hi})")
    return lo, hi


def _optional_range(
    sub: Any, name: str, where: str, default: tuple[float, float], low: float, high: float
) -> tuple[float, float]:
    return _range(getattr(sub, name), f"{where}.{name}", low, high) if sub.HasField(name) else default


def _axes(values: Sequence[int], field: str, most: int = MAX_AXES) -> tuple[int, ...]:
    axes = tuple(int(a) for a in values)
    if len(axes) > most:
        raise InvalidArgument(f"{field}: at most {most} axes, got {len(axes)}")
    for a in axes:
        if not -MAX_AXES <= a < MAX_AXES:
            raise InvalidArgument(f"{field}: axis {a} is out of [{-MAX_AXES}, {MAX_AXES})")
    if len(set(axes)) != len(axes):
        raise InvalidArgument(f"{field}: axes must differ, got {bounded_list(axes, 8)}")
    return axes


def _entries(sub: Any, where: str) -> tuple[str, ...]:
    entries = tuple(sub.entries)
    seen: set[str] = set()
    for entry in entries:
        if entry in seen:
            raise InvalidArgument(f"{where}.entries: {bounded(entry)} is listed twice")
        seen.add(entry)
    return entries


def _order(value: int, field: str) -> int:
    if value not in _ORDERS:
        raise InvalidArgument(f"{field}: unknown interpolation {value}")
    return _ORDERS[value]


# -- what a step does with a sample ------------------------------------------------------------------------------------


def _arrays(sample: Sample, entries: Sequence[str]) -> list[np.ndarray]:
    arrays = []
    for entry in entries:
        if entry not in sample:
            raise ValueError(ENTRY_NOT_EXTRACTED.format(_name(entry)))
        arr = sample[entry]
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"entry {_name(entry)!r} must be 'ndarray'")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"entry {_name(entry)!r} holds {arr.dtype}, not numbers")
        arrays.append(arr)
    return arrays


def _random_step(p: float, entries: tuple[str, ...], body: Body) -> RandomStep:
    def step(sample: Sample, rng: np.random.Generator) -> Sample:
        arrays = _arrays(sample, entries)  # a missing entry fails whatever the draw
        if not rng.random() < p or not entries:
            return sample
        out = dict(sample)
        out.update(zip(entries, body(arrays, rng), strict=True))
        return out

    return step


def _axis(axis: int, arr: np.ndarray, entry: str) -> int:
    if not -arr.ndim <= axis < arr.ndim:
        raise ValueError(f"axis {axis} is out of bounds for entry {_name(entry)!r} of shape {arr.shape}")
    return axis % arr.ndim


def _resolve(
    arrays: list[np.ndarray], entries: Sequence[str], axes: Sequence[int], most: int = MAX_AXES
) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Each entry's axes (``axes``, or every axis but the last when empty) and their sizes, the same for every
    entry."""
    resolved, sizes = [], None
    for arr, entry in zip(arrays, entries, strict=True):
        own = tuple(_axis(a, arr, entry) for a in axes) if axes else tuple(range(arr.ndim - 1))
        if not own:
            raise ValueError(f"entry {_name(entry)!r} of shape {arr.shape} has no spatial axis")
        if len(set(own)) != len(own):
            raise ValueError(f"axes {axes} name one axis twice for entry {_name(entry)!r} of shape {arr.shape}")
        if len(own) > most:
            raise ValueError(
                f"entry {_name(entry)!r} of shape {arr.shape} has {len(own)} spatial axes, at most {most} are "
                "supported; name them with spatial_axes"
            )
        own_sizes = tuple(arr.shape[a] for a in own)
        if sizes is None:
            sizes = own_sizes
        elif own_sizes != sizes:
            raise ValueError(
                f"entries must have the same size along the transformed axes: {_name(entries[0])!r} has "
                f"{sizes}, {_name(entry)!r} has {own_sizes}"
            )
        resolved.append(own)
    assert sizes is not None
    return resolved, sizes


def _floating(arrays: list[np.ndarray], entries: Sequence[str], what: str) -> None:
    for arr, entry in zip(arrays, entries, strict=True):
        if arr.dtype.kind != "f":
            raise ValueError(f"{what} changes intensities of floating entries; {_name(entry)!r} holds {arr.dtype}")


def _work_dtype(arr: np.ndarray) -> np.dtype[Any]:
    """The dtype a resampled array is computed in (scipy.ndimage takes neither bool nor float16)."""
    if arr.dtype == np.bool_:
        return np.dtype(np.uint8)
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 4:
        return np.dtype(np.float32)
    return arr.dtype


def _resample(arr: np.ndarray, axes: tuple[int, ...], order: int, fill: float, apply: Apply) -> np.ndarray:
    """``arr`` resampled over ``axes`` channel by channel: ``apply(channel, output, order, fill)`` fills one
    channel's output (an array of the spatial axes' sizes). Integer and bool arrays are resampled nearest-neighbour."""
    if arr.dtype.kind != "f":
        order = 0
    rest = [a for a in range(arr.ndim) if a not in axes]
    perm = rest + list(axes)
    moved = np.transpose(arr, perm)
    sizes = moved.shape[len(rest) :]
    work = _work_dtype(arr)
    channels = moved.reshape(-1, *sizes).astype(work, copy=False)
    out = np.empty((channels.shape[0], *sizes), dtype=work)
    if out.size:
        for c in range(channels.shape[0]):
            apply(channels[c], out[c], order, fill)
    result = out.reshape(moved.shape).astype(arr.dtype, copy=False)
    return np.ascontiguousarray(np.transpose(result, np.argsort(perm)))


# -- pymia's five ------------------------------------------------------------------------------------------------------


def _axes_per_value(given: Sequence[int], count: int, where: str, value: str) -> tuple[int, ...]:
    """pymia's ``axis``: one axis per value (default 0, 1, ...)."""
    axes = _axes(given, where) or tuple(range(count))
    if len(axes) != count:
        raise InvalidArgument(f"{where}: give one axis per {value} ({count}), got {len(axes)}")
    return axes


def _crop(sub: spec_pb2.RandomCrop, where: str, entries: tuple[str, ...]) -> Body:
    """Draws one anchor per axis, uniformly in [0, size - crop] (pymia leaves out the last one and so fails on a
    crop of the whole axis; here every anchor may be drawn)."""
    shape = tuple(int(s) for s in sub.shape)
    if not shape or len(shape) > MAX_AXES:
        raise InvalidArgument(f"{where}.shape: give 1 to {MAX_AXES} sizes, got {len(shape)}")
    if any(not 1 <= s <= MAX_SIZE for s in shape):
        raise InvalidArgument(f"{where}.shape: sizes must lie in [1, {MAX_SIZE}], got {bounded_list(shape, 8)}")
    axes = _axes_per_value(sub.axis, len(shape), f"{where}.axis", "size of shape")

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, sizes = _resolve(arrays, entries, axes)
        for size, crop, axis in zip(sizes, shape, axes, strict=True):
            if crop > size:
                raise ValueError(f"a crop of {crop} along axis {axis} does not fit its size {size}")
        anchors = [int(rng.integers(0, size - crop + 1)) for size, crop in zip(sizes, shape, strict=True)]
        out = []
        for arr, own in zip(arrays, resolved, strict=True):
            cut: list[slice] = [slice(None)] * arr.ndim
            for axis, anchor, crop in zip(own, anchors, shape, strict=True):
                cut[axis] = slice(anchor, anchor + crop)
            out.append(arr[tuple(cut)].copy())
        return out

    return body


def _mirror(sub: spec_pb2.RandomMirror, where: str, entries: tuple[str, ...]) -> Body:
    """Draws nothing but ``p``."""
    (axis,) = _axes([sub.axis], f"{where}.axis")

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, _ = _resolve(arrays, entries, (axis,))
        return [np.flip(arr, own).copy() for arr, own in zip(arrays, resolved, strict=True)]

    return body


def _rotation90(sub: spec_pb2.RandomRotation90, where: str, entries: tuple[str, ...]) -> Body:
    """Draws k in {1, 2, 3} (quarter turns)."""
    axes = _axes(sub.axes, f"{where}.axes")
    if len(axes) != 2:
        raise InvalidArgument(f"{where}.axes: give the two axes of the plane, got {len(axes)}")

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, sizes = _resolve(arrays, entries, axes)
        if sizes[0] != sizes[1]:  # pymia warns and turns the shape; a batch of mixed shapes fails later
            raise ValueError(f"the plane of axes {axes} must be square, entries have sizes {sizes}")
        k = int(rng.integers(1, 4))
        return [np.rot90(arr, k, axes=(own[0], own[1])).copy() for arr, own in zip(arrays, resolved, strict=True)]

    return body


def _shift(sub: spec_pb2.RandomShift, where: str, entries: tuple[str, ...]) -> Body:
    """Draws one roll per axis from [-m, m) with m = int(shift * size), 0 when m is 0 (pymia's)."""
    shifts = tuple(_number(s, f"{where}.shift", 0.0, 1.0) for s in sub.shift)
    if not shifts or len(shifts) > MAX_AXES:
        raise InvalidArgument(f"{where}.shift: give 1 to {MAX_AXES} fractions, got {len(shifts)}")
    axes = _axes_per_value(sub.axis, len(shifts), f"{where}.axis", "shift")

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, sizes = _resolve(arrays, entries, axes)
        maxima = [int(s * size) for s, size in zip(shifts, sizes, strict=True)]
        rolls = tuple(int(rng.integers(-m, m)) if m != 0 else 0 for m in maxima)
        return [np.roll(arr, rolls, own) for arr, own in zip(arrays, resolved, strict=True)]

    return body


def _bspline_basis(size: int, mesh: int) -> np.ndarray:
    """(size, mesh + 3) weights of a cubic B-spline's coefficients at an axis's voxels, laid out as SimpleITK's
    BSplineTransformInitializer lays its grid over an image of unit spacing: ``mesh`` cells over
    [-0.625, size - 0.375] (the voxels' extent and an eighth of a voxel), one coefficient before it and two after."""
    u = (np.arange(size, dtype=np.float64) + 0.625) * (mesh / (size + 0.25)) + 1.0
    t = np.abs(u[:, None] - np.arange(mesh + 3, dtype=np.float64)[None, :])
    weights = np.where(t < 1.0, 2.0 / 3.0 - t**2 + t**3 / 2.0, np.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))
    return weights.astype(np.float32)


def _elastic_field(coefficients: np.ndarray, sizes: tuple[int, ...], mesh: int) -> np.ndarray:
    """The displacement field (d, *sizes) of B-spline ``coefficients`` (d, *(mesh + 3,) * d), evaluated axis by axis."""
    field = coefficients
    for i, size in enumerate(sizes):
        field = np.moveaxis(np.tensordot(field, _bspline_basis(size, mesh), axes=([1 + i], [1])), -1, 1 + i)
    return field


def _elastic_warp(
    arrays: list[np.ndarray],
    resolved: list[tuple[int, ...]],
    sizes: tuple[int, ...],
    coefficients: np.ndarray,
    mesh: int,
    orders: Sequence[int],
    fill: float,
    max_bytes: int | None,
) -> list[np.ndarray]:
    """Each array sampled at (voxel + displacement)."""
    if max_bytes is not None:  # the field and the coordinates scipy works on
        check_sample_bytes(3 * len(sizes) * math.prod(sizes) * 4, max_bytes, "elastic displacement field")
    coordinates = _elastic_field(coefficients, sizes, mesh)
    coordinates += np.indices(sizes, dtype=np.float32)

    def apply(channel: np.ndarray, output: np.ndarray, order: int, cval: float) -> None:
        ndimage.map_coordinates(channel, coordinates, output=output, order=order, mode="grid-constant", cval=cval)

    return [_resample(arr, own, order, fill, apply) for arr, own, order in zip(arrays, resolved, orders, strict=True)]


def _elastic_deformation(
    sub: spec_pb2.RandomElasticDeformation, where: str, entries: tuple[str, ...], max_bytes: int | None
) -> Body:
    """pymia's: draws the B-spline coefficients of a grid of num_control_points cells per spatial axis, each
    ~ N(0, deformation_sigma) (one array of shape (axes, *grid), C order)."""
    mesh = int(sub.num_control_points)
    if not 2 <= mesh <= MAX_CONTROL_POINTS:
        raise InvalidArgument(f"{where}.num_control_points: must lie in [2, {MAX_CONTROL_POINTS}], got {mesh}")
    sigma = _number(sub.deformation_sigma, f"{where}.deformation_sigma", 0.0, MAX_DISPLACEMENT)
    if sub.interpolators and len(sub.interpolators) != len(entries):
        raise InvalidArgument(
            f"{where}.interpolators: give one per entry ({len(entries)}) or none, got {len(sub.interpolators)}"
        )
    orders = [_order(v, f"{where}.interpolators[{i}]") for i, v in enumerate(sub.interpolators)] or [3] * len(entries)
    axes = _axes(sub.spatial_axes, f"{where}.spatial_axes", MAX_SPATIAL_AXES)
    fill = _number(sub.fill_value, f"{where}.fill_value", -MAX_INTENSITY, MAX_INTENSITY)

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, sizes = _resolve(arrays, entries, axes, MAX_SPATIAL_AXES)
        d = len(sizes)
        coefficients = rng.standard_normal((d, *[mesh + 3] * d), dtype=np.float32) * np.float32(sigma)
        return _elastic_warp(arrays, resolved, sizes, coefficients, mesh, orders, fill, max_bytes)

    return body


# -- TorchIO and MONAI's -----------------------------------------------------------------------------------------------


def _flip(sub: spec_pb2.RandomFlip, where: str, entries: tuple[str, ...]) -> Body:
    """Draws u ~ U[0, 1) per axis (in the order given) and flips the axes whose u < flip_probability."""
    axes = _axes(sub.axes, f"{where}.axes")
    chance = _probability(
        float(sub.flip_probability) if sub.HasField("flip_probability") else 0.5, f"{where}.flip_probability"
    )

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, _ = _resolve(arrays, entries, axes)
        flips = rng.random(len(resolved[0])) < chance
        out = []
        for arr, own in zip(arrays, resolved, strict=True):
            chosen = tuple(a for a, flip in zip(own, flips, strict=True) if flip)
            out.append(np.flip(arr, chosen).copy() if chosen else arr)
        return out

    return body


_ROTATION_PLANES = {1: [], 2: [(0, 1)], 3: [(1, 2), (0, 2), (0, 1)]}
"""The planes of the rotation angles per number of spatial axes (in 3-D, angle i turns about axis i)."""


def _rotation(angles: Sequence[float], d: int) -> np.ndarray:
    matrix = np.eye(d)
    for (i, j), degrees in zip(_ROTATION_PLANES[d], angles, strict=True):
        c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        turn = np.eye(d)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = matrix @ turn
    return matrix


def _affine(sub: spec_pb2.RandomAffine, where: str, entries: tuple[str, ...]) -> Body:
    """Draws a scale per spatial axis, then an angle per rotation plane (one in 2-D, one about each axis in 3-D),
    then a translation per spatial axis. Content is scaled and turned about the centre ((size - 1) / 2) and moved by
    the translation (in voxels); output voxels that map outside the input take fill_value."""
    ranges = {}
    for name, low, high in (
        ("scales", 1.0 / MAX_SCALE, MAX_SCALE),
        ("degrees", -MAX_DEGREES, MAX_DEGREES),
        ("translation", -MAX_DISPLACEMENT, MAX_DISPLACEMENT),
    ):
        values = getattr(sub, name)
        if len(values) > MAX_SPATIAL_AXES:
            raise InvalidArgument(f"{where}.{name}: give one range or one per spatial axis, got {len(values)}")
        ranges[name] = [_range(r, f"{where}.{name}[{i}]", low, high) for i, r in enumerate(values)]
    order = _order(sub.interpolation, f"{where}.interpolation")
    axes = _axes(sub.spatial_axes, f"{where}.spatial_axes", MAX_SPATIAL_AXES)
    fill = _number(sub.fill_value, f"{where}.fill_value", -MAX_INTENSITY, MAX_INTENSITY)

    def draw(name: str, count: int, rng: np.random.Generator) -> list[float] | None:
        given = ranges[name]
        if not given:
            return None
        if len(given) not in (1, count):
            raise ValueError(f"{name}: give one range or {count} (one per {name} of this sample), got {len(given)}")
        return [float(rng.uniform(*given[0 if len(given) == 1 else i])) for i in range(count)]

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, sizes = _resolve(arrays, entries, axes, MAX_SPATIAL_AXES)
        d = len(sizes)
        planes = len(_ROTATION_PLANES[d])
        if ranges["degrees"] and not planes:
            raise ValueError("degrees: one spatial axis has no rotation")
        scales = draw("scales", d, rng) or [1.0] * d
        angles = draw("degrees", planes, rng) or [0.0] * planes
        shift = draw("translation", d, rng) or [0.0] * d
        forward = _rotation(angles, d) @ np.diag(scales)
        inverse = np.linalg.inv(forward)
        centre = (np.asarray(sizes, dtype=np.float64) - 1.0) / 2.0
        offset = centre - inverse @ (centre + np.asarray(shift))

        def apply(channel: np.ndarray, output: np.ndarray, order: int, cval: float) -> None:
            ndimage.affine_transform(
                channel, inverse, offset=offset, output=output, order=order, mode="grid-constant", cval=cval
            )

        return [_resample(arr, own, order, fill, apply) for arr, own in zip(arrays, resolved, strict=True)]

    return body


def _elastic(sub: spec_pb2.RandomElastic, where: str, entries: tuple[str, ...], max_bytes: int | None) -> Body:
    """TorchIO's: draws the B-spline coefficients of num_control_points per spatial axis, each ~ U(-max, max)
    (one array of shape (axes, *grid), C order); the two outer layers along every axis then stay still (TorchIO's
    locked_borders=2, which it applies to two of three axes only)."""
    points = int(sub.num_control_points) if sub.HasField("num_control_points") else 7
    if not 4 <= points <= MAX_CONTROL_POINTS:
        raise InvalidArgument(f"{where}.num_control_points: must lie in [4, {MAX_CONTROL_POINTS}], got {points}")
    largest = _number(
        sub.max_displacement if sub.HasField("max_displacement") else 7.5,
        f"{where}.max_displacement",
        0.0,
        MAX_DISPLACEMENT,
    )
    order = _order(sub.interpolation, f"{where}.interpolation")
    axes = _axes(sub.spatial_axes, f"{where}.spatial_axes", MAX_SPATIAL_AXES)
    fill = _number(sub.fill_value, f"{where}.fill_value", -MAX_INTENSITY, MAX_INTENSITY)

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        resolved, sizes = _resolve(arrays, entries, axes, MAX_SPATIAL_AXES)
        d = len(sizes)
        coefficients = (rng.random((d, *[points] * d), dtype=np.float32) * 2 - 1) * np.float32(largest)
        for i in range(d):
            border: list[Any] = [slice(None)] * (d + 1)
            border[1 + i] = [0, 1, -2, -1]
            coefficients[tuple(border)] = 0
        return _elastic_warp(arrays, resolved, sizes, coefficients, points - 3, [order] * len(arrays), fill, max_bytes)

    return body


def _gamma(sub: spec_pb2.RandomGamma, where: str, entries: tuple[str, ...]) -> Body:
    """Draws log(gamma), one for every entry."""
    low, high = _optional_range(sub, "log_gamma", where, (-0.3, 0.3), -MAX_LOG_GAMMA, MAX_LOG_GAMMA)

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        _floating(arrays, entries, "RandomGamma")
        gamma = math.exp(rng.uniform(low, high))
        out = []
        for arr in arrays:
            work = arr.astype(_work_dtype(arr), copy=False)
            out.append((np.sign(work) * np.abs(work) ** work.dtype.type(gamma)).astype(arr.dtype, copy=False))
        return out

    return body


def _noise(sub: spec_pb2.RandomNoise, where: str, entries: tuple[str, ...]) -> Body:
    """Draws the standard deviation, then each entry's noise (standard normal values of its shape, in its order)."""
    mean = _number(sub.mean, f"{where}.mean", -MAX_INTENSITY, MAX_INTENSITY)
    low, high = _optional_range(sub, "std", where, (0.0, 0.25), 0.0, MAX_INTENSITY)

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        _floating(arrays, entries, "RandomNoise")
        std = rng.uniform(low, high)
        out = []
        for arr in arrays:
            work = _work_dtype(arr)
            noise = rng.standard_normal(arr.shape, dtype=work)
            noise *= work.type(std)
            noise += work.type(mean)
            noise += arr
            out.append(noise.astype(arr.dtype, copy=False))
        return out

    return body


def _monomials(order: int, d: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials of total degree <= order in d variables, in lexicographic order (TorchIO's)."""
    return [e for e in itertools.product(range(order + 1), repeat=d) if sum(e) <= order]


def _bias_field(sub: spec_pb2.RandomBiasField, where: str, entries: tuple[str, ...]) -> Body:
    """Draws the polynomial's coefficients, one per monomial in lexicographic order of the exponents (TorchIO's);
    each spatial axis runs over [-1, 1]."""
    largest = _number(
        sub.coefficients if sub.HasField("coefficients") else 0.5, f"{where}.coefficients", 0.0, MAX_BIAS_COEFFICIENT
    )
    order = int(sub.order) if sub.HasField("order") else 3
    if not 0 <= order <= MAX_BIAS_ORDER:
        raise InvalidArgument(f"{where}.order: must lie in [0, {MAX_BIAS_ORDER}], got {order}")
    axes = _axes(sub.spatial_axes, f"{where}.spatial_axes", MAX_SPATIAL_AXES)

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        _floating(arrays, entries, "RandomBiasField")
        resolved, sizes = _resolve(arrays, entries, axes, MAX_SPATIAL_AXES)
        d = len(sizes)
        exponents = _monomials(order, d)
        tensor = np.zeros([order + 1] * d, dtype=np.float32)
        for e, c in zip(exponents, rng.uniform(-largest, largest, len(exponents)), strict=True):
            tensor[e] = c
        field: np.ndarray = tensor
        for size in sizes:  # contracts the first remaining exponent axis; the new voxel axis goes last
            powers = np.linspace(-1.0, 1.0, size, dtype=np.float32)[:, None] ** np.arange(order + 1, dtype=np.float32)
            field = np.tensordot(field, powers, axes=([0], [1]))
        field = np.exp(field)
        out = []
        for arr, own in zip(arrays, resolved, strict=True):
            along = np.transpose(field, np.argsort(own))  # the field's axes in the array's axis order
            shape = [arr.shape[a] if a in own else 1 for a in range(arr.ndim)]
            out.append((arr * along.reshape(shape)).astype(arr.dtype, copy=False))
        return out

    return body


def _scale_shift(sub: spec_pb2.RandomIntensityScaleShift, where: str, entries: tuple[str, ...]) -> Body:
    """Draws s, then o, one of each for every entry."""
    scale = _optional_range(sub, "scale", where, (0.0, 0.0), -MAX_INTENSITY, MAX_INTENSITY)
    shift = _optional_range(sub, "shift", where, (0.0, 0.0), -MAX_INTENSITY, MAX_INTENSITY)

    def body(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        _floating(arrays, entries, "RandomIntensityScaleShift")
        s = rng.uniform(*scale)
        o = rng.uniform(*shift)
        out = []
        for arr in arrays:
            work = arr.astype(_work_dtype(arr), copy=False)
            out.append((work * work.dtype.type(1.0 + s) + work.dtype.type(o)).astype(arr.dtype, copy=False))
        return out

    return body


_COMPILERS: dict[str, Callable[[Any, str, tuple[str, ...], int | None], Body]] = {
    "random_crop": lambda sub, where, entries, max_bytes: _crop(sub, where, entries),
    "random_mirror": lambda sub, where, entries, max_bytes: _mirror(sub, where, entries),
    "random_rotation90": lambda sub, where, entries, max_bytes: _rotation90(sub, where, entries),
    "random_shift": lambda sub, where, entries, max_bytes: _shift(sub, where, entries),
    "random_elastic_deformation": _elastic_deformation,
    "random_flip": lambda sub, where, entries, max_bytes: _flip(sub, where, entries),
    "random_affine": lambda sub, where, entries, max_bytes: _affine(sub, where, entries),
    "random_elastic": _elastic,
    "random_gamma": lambda sub, where, entries, max_bytes: _gamma(sub, where, entries),
    "random_noise": lambda sub, where, entries, max_bytes: _noise(sub, where, entries),
    "random_bias_field": lambda sub, where, entries, max_bytes: _bias_field(sub, where, entries),
    "random_intensity_scale_shift": lambda sub, where, entries, max_bytes: _scale_shift(sub, where, entries),
}
_DEFAULT_P = {"random_elastic_deformation": 0.5}
"""Absent p where it is not 1.0 (pymia's defaults)."""

AUGMENTATIONS: frozenset[str] = frozenset(_COMPILERS)
"""Transform oneof names of the random transforms."""


def compile_augmentation(kind: str, sub: Any, where: str, max_bytes: int | None) -> RandomStep:
    """The random transform ``sub`` (the Transform oneof's ``kind`` choice, at field path ``where``) compiled;
    ``max_bytes`` bounds what it may allocate beyond the sample's own size (an elastic transform's field)."""
    compiler = _COMPILERS.get(kind)
    if compiler is None:
        raise InvalidArgument(f"{where}: unknown transform {kind!r}")
    entries = _entries(sub, where)
    p = _p(sub, where, _DEFAULT_P.get(kind, 1.0))
    return _random_step(p, entries, compiler(sub, where, entries, max_bytes))
