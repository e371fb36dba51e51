"""A deterministic synthetic brain "phantom" dataset shaped like pymia's example data.

pymia's example data (4 Human Connectome Project subjects) cannot be downloaded here, so the service and its
benchmarks use a stand-in with the same layout, sizes and geometry: subjects ``Subject_1..Subject_N``, category
``images`` with entries ``T1`` and ``T2`` (float32) and category ``labels`` with entry ``GT`` (uint8: 0 background,
1 white matter, 2 grey matter, 3 hippocampus, 4 amygdala, 5 thalamus). The anatomy is a handful of ellipsoids with
a folded cortex, ventricles and a scalp; each subject is jittered a little. Intensities follow the label with
T1-like and T2-like contrast (white matter bright in T1, CSF bright in T2), a smooth multiplicative bias field and
noise. Everything is a function of ``(seed, subject index)`` only.

Generating the full default set (4 x 181 x 217 x 181) takes a few seconds; subjects are generated one at a time,
so peak memory stays at roughly one subject.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from patchwire.service._pymia_format import SubjectRecord, write_pymia_dataset
from patchwire.wire.geometry import ImageProperties

__all__ = [
    "LABEL_NAMES",
    "PHANTOM_FILE_NAME",
    "LazySubjects",
    "default_phantom_path",
    "ensure_phantom_dataset",
    "make_phantom_dataset",
    "make_phantom_subject",
]

logger = logging.getLogger(__name__)

PHANTOM_FILE_NAME = "phantom-v1.h5"
"""Bump the version whenever the generator's output changes, so cached files are regenerated."""

LABEL_NAMES = ("background", "white matter", "grey matter", "hippocampus", "amygdala", "thalamus")
"""Label value -> structure, as in pymia's example data."""

ORIGIN = (-90.0, 126.0, -72.0)
SPACING = (1.0, 1.0, 1.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
DEFAULT_SHAPE = (181, 217, 181)  # numpy (z, y, x); ITK size is the same reversed

# Internal tissue classes: the labels 0-5 plus two that are labelled background.
_AIR, _WM, _GM, _HIPPO, _AMYG, _THAL, _CSF, _SCALP = range(8)
_TISSUE_TO_LABEL = np.array([0, 1, 2, 3, 4, 5, 0, 0], dtype=np.uint8)
# Mean intensity per tissue class, on a 0-1000 scale. T1: WM > GM > CSF; T2: CSF > GM > WM; fat-rich scalp is
# bright in T1 and moderate in T2.
_T1_MEAN = np.array([0, 820, 560, 540, 580, 700, 180, 760], dtype=np.float32)
_T2_MEAN = np.array([0, 420, 620, 680, 650, 520, 980, 480], dtype=np.float32)
_NOISE_SD = np.float32(18.0)


def default_phantom_path(environ: Mapping[str, str] | None = None) -> Path:
    """Returns ``$PATCHWIRE_HOME/phantom-v1.h5``, or ``~/.cache/patchwire/phantom-v1.h5`` if it is unset or empty.

    ``environ`` defaults to :data:`os.environ`; ``HOME`` is taken from it when present.
    """
    env = os.environ if environ is None else environ
    home = env.get("PATCHWIRE_HOME")
    if home:
        return Path(home) / PHANTOM_FILE_NAME
    user_home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return user_home / ".cache" / "patchwire" / PHANTOM_FILE_NAME


def ensure_phantom_dataset(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """Returns the path of the default phantom dataset, creating it (with its folder) only if it is missing.

    ``path`` defaults to :func:`default_phantom_path` of ``environ``. Concurrent first use is safe: each writer
    writes its own temporary file and renames it into place, so readers only ever see a complete file.
    """
    target = Path(path) if path is not None else default_phantom_path(environ)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("phantom dataset %s missing, generating it", target)
    make_phantom_dataset(target)
    return target


def make_phantom_dataset(
    path: str | os.PathLike[str], subjects: int = 4, shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0
) -> None:
    """Writes a phantom dataset of ``subjects`` subjects with numpy image shape ``shape`` (z, y, x) to ``path``.

    The output is a pure function of the arguments. Source files are recorded with pymia-like synthetic names
    (see :class:`SubjectRecord`).
    """
    if subjects < 1:
        raise ValueError(f"subjects must be at least 1, got {subjects}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive numpy sizes (z, y, x), got {shape}")
    start = time.perf_counter()
    write_pymia_dataset(
        path, LazySubjects(subjects, lambda index: make_phantom_subject(index, (shape[0], shape[1], shape[2]), seed))
    )
    logger.info(
        "wrote phantom dataset %s (%d subjects, shape %s, seed %d) in %.2f s",
        path,
        subjects,
        shape,
        seed,
        time.perf_counter() - start,
    )


def make_phantom_subject(index: int, shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0) -> SubjectRecord:
    """Generates subject ``index`` (0-based; named ``Subject_<index + 1>``) of the phantom dataset."""
    rng = np.random.default_rng([seed, index])
    tissue = _tissue_map(rng, shape)
    labels = _TISSUE_TO_LABEL[tissue]
    t1 = _intensities(rng, tissue, _T1_MEAN)
    t2 = _intensities(rng, tissue, _T2_MEAN)
    del tissue
    name = f"Subject_{index + 1}"
    return SubjectRecord(
        name=name,
        categories={"images": {"T1": t1, "T2": t2}, "labels": {"GT": labels}},
        geometry=ImageProperties(size=tuple(reversed(shape)), origin=ORIGIN, spacing=SPACING, direction=DIRECTION),
    )


class LazySubjects(Sequence[SubjectRecord]):
    """``count`` subjects made on access by ``make(index)`` (0-based), so that writing them with
    :func:`~patchwire.service._pymia_format.write_pymia_dataset` holds only the one being written in memory."""

    def __init__(self, count: int, make: Callable[[int], SubjectRecord]) -> None:
        self._count = count
        self._make = make

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, item: int) -> SubjectRecord: ...

    @overload
    def __getitem__(self, item: slice) -> list[SubjectRecord]: ...

    def __getitem__(self, item: int | slice) -> SubjectRecord | list[SubjectRecord]:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(self._count))]
        index = range(self._count)[item]  # normalises negatives, raises IndexError
        return self._make(index)

    def __iter__(self) -> Iterator[SubjectRecord]:
        return (self[i] for i in range(self._count))


def _tissue_map(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Returns the uint8 tissue-class map of one subject (numpy z, y, x; z superior, y anterior-posterior, x L-R)."""
    # Normalised coordinates in [-1, 1] per axis, kept 1-D and broadcast so no full-volume grids are built.
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) if n > 1 else np.zeros(1, np.float32) for n in shape]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]

    def jitter(scale: float, size: int = 3) -> np.ndarray:
        return (1.0 + scale * rng.uniform(-1.0, 1.0, size)).astype(np.float32)

    centre = rng.uniform(-0.02, 0.02, 3).astype(np.float32) + np.array([0.02, 0.0, 0.0], dtype=np.float32)
    cz, cy, cx = (float(c) for c in centre)
    head_radii = np.array([0.86, 0.86, 0.86], dtype=np.float32) * jitter(0.03)
    brain_radii = head_radii * np.array([0.86, 0.88, 0.85], dtype=np.float32)
    zc, yc, xc = z - np.float32(cz), y - np.float32(cy), x - np.float32(cx)

    tissue = np.zeros(shape, dtype=np.uint8)
    head = (zc / head_radii[0]) ** 2 + (yc / head_radii[1]) ** 2 + (xc / head_radii[2]) ** 2
    tissue[head < 1.0] = _SCALP
    brain = (zc / brain_radii[0]) ** 2 + (yc / brain_radii[1]) ** 2 + (xc / brain_radii[2]) ** 2
    del head
    tissue[brain < 1.0] = _CSF  # the thin sulcal CSF layer that remains between cortex and skull
    # Cortex: a slightly wavy surface inside the CSF layer; white matter: a strongly folded surface inside that.
    freqs = rng.uniform(17.0, 23.0, 3).astype(np.float32)
    phases = rng.uniform(0.0, 2 * np.pi, 3).astype(np.float32)
    wz = np.sin(freqs[0] * z + phases[0])
    wy = np.sin(freqs[1] * y + phases[1])
    wx = np.sin(freqs[2] * x + phases[2])
    folds = wz * wy + wy * wx + wx * wz  # smooth, in [-3, 3]
    brain /= np.float32(0.92**2)
    brain += np.float32(0.02) * folds
    tissue[brain < 1.0] = _GM
    brain /= np.float32(0.82**2)
    brain += np.float32(0.12) * folds
    tissue[brain < 1.0] = _WM
    del brain, folds
    # Interhemispheric fissure: a sagittal CSF gap through the upper half of the cortex.
    _fissure(tissue, axes, cx)

    # Deep structures, mirrored left/right: (centre, radii, tilt) as fractions of the brain radii. Index 0 of y is
    # posterior (ITK direction -1 on y), so anterior is +y: the amygdala sits in front of the hippocampus, whose
    # long axis rises towards the back.
    s = brain_radii
    for side in (-1.0, 1.0):
        _paint(tissue, axes, _CSF, (0.15, 0.02, side * 0.13), (0.16, 0.38, 0.07), 0.0, s, centre, rng)  # ventricle
        _paint(tissue, axes, _THAL, (0.02, -0.08, side * 0.13), (0.12, 0.17, 0.10), 0.0, s, centre, rng)
        _paint(tissue, axes, _HIPPO, (-0.30, -0.12, side * 0.37), (0.07, 0.30, 0.07), 0.45, s, centre, rng)
        _paint(tissue, axes, _AMYG, (-0.40, 0.16, side * 0.35), (0.09, 0.10, 0.08), 0.0, s, centre, rng)
    return tissue


def _fissure(tissue: np.ndarray, axes: list[np.ndarray], cx: float) -> None:
    width = max(1, round(0.012 * tissue.shape[2]))  # about 2 voxels at full size
    first = max(0, int(np.argmin(np.abs(axes[2] - cx))) - width // 2)
    rows = np.flatnonzero(axes[0] > 0.15)
    if rows.size == 0:
        return
    block = tissue[int(rows[0]) :, :, first : first + width]
    block[(block == _GM) | (block == _WM)] = _CSF


def _paint(
    tissue: np.ndarray,
    axes: list[np.ndarray],
    value: int,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    tilt: float,
    scale: np.ndarray,
    offset: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Paints a jittered ellipsoid (tilted by ``tilt`` radians in the z-y plane) into the voxels of its bounding box."""
    c = np.asarray(centre, np.float32) * scale * (1.0 + 0.05 * rng.uniform(-1, 1, 3)) + offset
    r = np.asarray(radii, np.float32) * scale * (1.0 + 0.08 * rng.uniform(-1, 1, 3))
    tilt += 0.08 * rng.uniform(-1, 1)
    extent = np.full(3, r.max(), np.float32)
    box = []
    for axis, coords in enumerate(axes):
        inside = np.flatnonzero(np.abs(coords - c[axis]) <= extent[axis])
        if inside.size == 0:
            return
        box.append(slice(int(inside[0]), int(inside[-1]) + 1))
    dz = axes[0][box[0]][:, None, None] - c[0]
    dy = axes[1][box[1]][None, :, None] - c[1]
    dx = axes[2][box[2]][None, None, :] - c[2]
    cos, sin = np.float32(np.cos(tilt)), np.float32(np.sin(tilt))
    u = cos * dz + sin * dy
    v = cos * dy - sin * dz
    inside = (u / r[0]) ** 2 + (v / r[1]) ** 2 + (dx / r[2]) ** 2 < 1.0
    region = tissue[tuple(box)]
    region[inside & (region != _AIR) & (region != _SCALP)] = value


def _intensities(rng: np.random.Generator, tissue: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Returns float32 intensities: per-tissue means with subject jitter, light blur, smooth bias field and noise."""
    lut = means * (1.0 + 0.04 * rng.uniform(-1.0, 1.0, means.shape)).astype(np.float32)
    image = lut[tissue]
    _blur(image)  # partial-volume edges
    # Multiplicative bias: a separable product of low-order polynomials, within about +-10 %.
    for axis, n in enumerate(image.shape):
        t = np.linspace(-1.0, 1.0, n, dtype=np.float32) if n > 1 else np.zeros(1, np.float32)
        a, b = rng.uniform(-0.06, 0.06, 2).astype(np.float32)
        profile = 1.0 + a * t + b * (t * t - np.float32(1 / 3))
        view_shape = [1, 1, 1]
        view_shape[axis] = n
        image *= profile.reshape(view_shape)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= _NOISE_SD
    image += noise
    del noise
    np.abs(image, out=image)  # magnitude images are non-negative (Rician-like background)
    return image


def _blur(image: np.ndarray) -> None:
    """In-place [1, 2, 1] / 4 smoothing along each axis (edges left as they are)."""
    for axis in range(image.ndim):
        if image.shape[axis] < 3:
            continue
        lo = [slice(None)] * image.ndim
        mid = [slice(None)] * image.ndim
        hi = [slice(None)] * image.ndim
        lo[axis], mid[axis], hi[axis] = slice(None, -2), slice(1, -1), slice(2, None)
        total = image[tuple(lo)] + image[tuple(hi)]
        total += image[tuple(mid)] * np.float32(2.0)
        total *= np.float32(0.25)
        image[tuple(mid)] = total
