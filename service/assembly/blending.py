"""Weights for assembling overlapping patches into a volume.

A sliding-window prediction is assembled as ``sum(w * patch) / sum(w)`` over the patches that cover each voxel.
Three modes say what ``w`` is:

- ``"overwrite"``: a later patch replaces an earlier one; no weights (:func:`region_weights` gives ``None``).
- ``"average"``: the plain mean; every voxel weighs 1 (``None`` again: the caller treats it as weight 1 and needs
  no array).
- ``"gaussian"``: the mean weighted by a Gaussian centred on each patch, so voxels near a patch's centre, where a
  network sees the most context, count more than voxels at its border (nnU-Net's ``compute_gaussian``, MONAI's
  ``BlendMode.GAUSSIAN``).

:func:`gaussian_weights` is separable: the product over axes of ``exp(-(x - c)**2 / (2 * sigma**2))`` with the centre
``c = (size - 1) / 2`` (exactly the middle, so the map is mirror-symmetric, also for even sizes; nnU-Net puts
the peak at ``size // 2``) and ``sigma = sigma_scale * size`` per axis (nnU-Net's default ``sigma_scale`` is 1/8). It
is computed in float64, normalised to a maximum of exactly 1, and clamped below at :data:`MIN_WEIGHT` (or the
smallest normal number of ``dtype``, if larger) so that no voxel, not even a far corner, gets weight 0 and the
division by ``sum(w)`` is always defined (nnU-Net replaces zeros by the smallest non-zero value). Maps are cached
per (shape, sigma_scale, dtype) and returned read-only: share them, never write into them.

A region smaller than a patch (an incomplete border patch that h5py clamped) gets the Gaussian of its own shape
rather than a cut-out of the patch's, so its centre still weighs 1.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

__all__ = [
    "BLEND_MODES",
    "MIN_WEIGHT",
    "BlendMode",
    "gaussian_weights",
    "region_weights",
]

BlendMode = Literal["overwrite", "average", "gaussian"]
BLEND_MODES: tuple[str, ...] = get_args(BlendMode)

MIN_WEIGHT = 1e-6
"""Lower bound of every Gaussian weight (raised to the dtype's smallest normal number where that is larger)."""

_DEFAULT_SIGMA_SCALE = 1 / 8


def gaussian_weights(
    patch_shape: Sequence[int], sigma_scale: float = _DEFAULT_SIGMA_SCALE, dtype: npt.DTypeLike = np.float32
) -> np.ndarray:
    """A read-only Gaussian importance map of ``patch_shape``: 1 at the centre, at least ``MIN_WEIGHT`` anywhere.

    ``sigma_scale`` times the size of an axis is the standard deviation along that axis. The same array object is
    returned for the same (shape, sigma_scale, dtype).
    """
    try:
        shape = tuple(operator.index(s) for s in patch_shape)
    except TypeError:
        raise ValueError(f"gaussian_weights: patch_shape must hold integers, got {patch_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"gaussian_weights: patch_shape must hold positive sizes, got {tuple(patch_shape)}")
    scale = float(sigma_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"gaussian_weights: sigma_scale must be positive and finite, got {sigma_scale}")
    kind = np.dtype(dtype)
    if kind.kind != "f":
        raise ValueError(f"gaussian_weights: dtype must be a floating type, got {kind}")
    return _gaussian(shape, scale, kind)


def region_weights(
    region_shape: Sequence[int],
    mode: str,
    sigma_scale: float = _DEFAULT_SIGMA_SCALE,
    dtype: npt.DTypeLike = np.float32,
) -> np.ndarray | None:
    """Weights of a region in ``mode``: ``None`` (weight 1 everywhere) or the region's own Gaussian.

    ``region_shape`` is the shape actually written, which is smaller than the patch for a clamped border patch.
    """
    if mode in ("overwrite", "average"):
        return None
    if mode == "gaussian":
        return gaussian_weights(region_shape, sigma_scale, dtype)
    raise ValueError(f"unknown blend mode {mode!r}; expected one of {', '.join(BLEND_MODES)}")


@functools.lru_cache(maxsize=64)
def _gaussian(shape: tuple[int, ...], sigma_scale: float, dtype: np.dtype) -> np.ndarray:
    profiles = []
    for size in shape:
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2
        profile = np.exp(-(x**2) / (2 * (sigma_scale * size) ** 2))
        profiles.append(profile / profile.max())  # the central voxel(s) of each axis weigh exactly 1
    weights = functools.reduce(np.multiply.outer, profiles)
    floor = max(MIN_WEIGHT, float(np.finfo(dtype).tiny))
    out = np.maximum(weights, floor).astype(dtype)
    out.flags.writeable = False
    return out
