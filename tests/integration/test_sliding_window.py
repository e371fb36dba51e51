"""Sliding-window (overlapping) patch grids and the Gaussian blending weights for assembling them.

Grids are checked on tiny hand-computed shapes, for coverage on random shapes (Hypothesis, against the server's
``_PatchWise`` directly), and through a real server against the whole volume; the weights on their defining
properties.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service._errors import InvalidArgument
from patchwire.service._indexing import _PatchWise, compile_indexing
from patchwire.service.assembly.blending import MIN_WEIGHT, gaussian_weights, region_weights

TINY_SHAPE = (20, 24, 16)


def starts(dim: int, patch: int, stride: int | None, ignore_incomplete: bool = True) -> list[int]:
    """Patch starts along one axis, as the server computes them."""
    indexing = _PatchWise((patch,), ignore_incomplete, None if stride is None else (stride,))
    return [indexing.expression((dim,), k)[0].start for k in range(indexing.count((dim,)))]


def expressions(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int], keep: bool = False) -> list:
    indexing = _PatchWise(patch, not keep, stride)
    return [indexing.expression(shape, k) for k in range(indexing.count(shape))]


# -- hand-computed grids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "patch", "stride", "expected"),
    [
        (10, 4, 3, [0, 3, 6]),  # the last regular patch ends exactly at 10
        (10, 4, 4, [0, 4, 6]),  # 0, 4 regular; 8 + 4 > 10, so a border patch at 10 - 4
        (10, 4, 2, [0, 2, 4, 6]),
        (10, 4, 1, [0, 1, 2, 3, 4, 5, 6]),
        (11, 4, 3, [0, 3, 6, 7]),
        (4, 4, 1, [0]),  # the patch is the whole axis
        (5, 4, 4, [0, 1]),
        (20, 8, 6, [0, 6, 12]),
    ],
)
def test_axis_starts(dim: int, patch: int, stride: int, expected: list[int]) -> None:
    assert starts(dim, patch, stride) == expected
    assert starts(dim, patch, stride, ignore_incomplete=False) == expected  # every patch is complete


def test_axis_shorter_than_patch_has_one_clamped_patch_kept_only_when_asked() -> None:
    assert starts(3, 4, 2, ignore_incomplete=True) == []
    assert starts(3, 4, 2, ignore_incomplete=False) == [0]
    assert expressions((3,), (4,), (2,), keep=True) == [(slice(0, 4),)]  # h5py clamps it to the 3 voxels
    assert starts(0, 4, 2, ignore_incomplete=False) == []


def test_grid_is_c_ordered_with_patch_size_slices() -> None:
    # axis 0: dim 5, patch 3, stride 2 -> 0, 2; axis 1: dim 4, patch 2, stride 1 -> 0, 1, 2
    assert expressions((5, 4, 7), (3, 2), (2, 1)) == [
        (slice(0, 3), slice(0, 2)),
        (slice(0, 3), slice(1, 3)),
        (slice(0, 3), slice(2, 4)),
        (slice(2, 5), slice(0, 2)),
        (slice(2, 5), slice(1, 3)),
        (slice(2, 5), slice(2, 4)),
    ]


def test_no_stride_is_pymias_grid() -> None:
    assert starts(10, 4, None, ignore_incomplete=True) == [0, 4]
    assert starts(10, 4, None, ignore_incomplete=False) == [0, 4, 8]  # the last one clamped by h5py
    assert _PatchWise((4,), True, []).stride is None  # an empty stride on the wire is pymia's grid


def test_one_patch_axis_of_a_multichannel_image() -> None:
    indexing = _PatchWise((4,), True, (3,))
    assert indexing.count((10, 7, 2)) == 3
    assert indexing.expression((10, 7, 2), 2) == (slice(6, 10),)


# -- coverage on random shapes ---------------------------------------------------------------------------------------


@st.composite
def _grids(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]:
    ndim = draw(st.integers(1, 3))
    patch = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, p)) for p in patch)
    keep = draw(st.booleans())
    # shorter-than-patch axes only where the clamped patch is kept, so every voxel is still covered
    shape = tuple(draw(st.integers(1 if keep else p, 20)) for p in patch)
    return shape, patch, stride, keep


@settings(max_examples=50, deadline=None)
@given(grid=_grids())
def test_patches_cover_every_voxel(grid: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]) -> None:
    shape, patch, stride, keep = grid
    indexing = _PatchWise(patch, not keep, stride)
    count = indexing.count(shape)
    exprs = [indexing.expression(shape, k) for k in range(count)]
    assert len({tuple(sl.start for sl in e) for e in exprs}) == count, "a patch appears twice"
    covered = np.zeros(shape, dtype=np.int64)
    for expr in exprs:
        for sl, p, d in zip(expr, patch, shape, strict=True):
            assert sl.stop - sl.start == p
            assert sl.start >= 0 and (sl.stop <= d or (sl.start == 0 and d < p))  # full size, or clamped at 0
        covered[expr] += 1
    assert covered.min() >= 1
    # consecutive starts along an axis are at most a stride apart (the border patch is closer)
    for axis in range(len(shape)):
        axis_starts = sorted({e[axis].start for e in exprs})
        assert all(0 < b - a <= stride[axis] for a, b in itertools.pairwise(axis_starts))
    assert exprs == sorted(exprs, key=lambda e: tuple(s.start for s in e)), "not C-ordered"


# -- client parameters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "overlap", "stride"),
    [
        ((8, 8, 8), 0.5, (4, 4, 4)),
        ((8, 8, 8), 0.0, (8, 8, 8)),
        ((10, 5, 3), 0.25, (8, 4, 2)),  # 7.5 -> 8, 3.75 -> 4, 2.25 -> 2
        ((5,), 0.5, (2,)),  # 2.5 rounds to the even 2
        ((4, 4), 0.99, (1, 1)),  # round(0.04) = 0 is raised to 1
        ((8, 6), (0.5, 0.0), (4, 6)),
    ],
)
def test_overlap_becomes_stride(patch: tuple[int, ...], overlap: float | tuple[float, ...], stride: tuple) -> None:
    indexing = extr.PatchWiseIndexing(patch, overlap=overlap)
    assert indexing.stride == stride
    assert tuple(indexing._to_proto().patch_wise.stride) == stride


def test_stride_travels_and_default_sends_none() -> None:
    assert extr.PatchWiseIndexing((4, 4), stride=2).stride == (2, 2)
    assert tuple(extr.PatchWiseIndexing((4, 4), stride=(3, 1))._to_proto().patch_wise.stride) == (3, 1)
    assert tuple(extr.PatchWiseIndexing((4, 4), stride=np.int64(2))._to_proto().patch_wise.stride) == (2, 2)
    default = extr.PatchWiseIndexing((4, 4))
    assert default.stride is None
    assert list(default._to_proto().patch_wise.stride) == []
    assert repr(default) == "PatchWiseIndexing (patch shape=(4, 4), ignore incomplete=True)"
    compiled = compile_indexing(extr.PatchWiseIndexing((4, 4), False, stride=(3, 2))._to_proto())
    assert isinstance(compiled, _PatchWise)
    assert (compiled.stride, compiled.ignore_incomplete) == ((3, 2), False)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"stride": 2, "overlap": 0.5}, "not both"),
        ({"overlap": 1.0}, "[0, 1)"),
        ({"overlap": -0.1}, "[0, 1)"),
        ({"overlap": (0.5, 0.5)}, "2 values"),
        ({"stride": ()}, "empty"),
    ],
)
def test_bad_client_parameters_are_value_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        extr.PatchWiseIndexing((4, 4, 4), **kwargs)


@pytest.mark.parametrize(
    ("stride", "fragments"),
    [
        ((0, 2, 2), ("stride 0 on axis 0", "1..4")),
        ((2, 5, 2), ("stride 5 on axis 1", "1..4")),
        ((2, 2), ("2 values for 3 patch axes",)),
        ((2, 2, 2, 2), ("4 values for 3 patch axes",)),
    ],
)
def test_bad_stride_on_the_server(stride: tuple[int, ...], fragments: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match=re.escape("indexing_strategy.patch_wise.stride")) as info:
        _PatchWise((4, 4, 4), True, stride)
    for fragment in fragments:
        assert fragment in str(info.value)


# -- through a real server -------------------------------------------------------------------------------------------


@pytest.fixture
def full_images(client: pw.Client) -> Iterator[list[np.ndarray]]:
    ds = client.datasource("tiny", extr.EmptyIndexing(), extr.DataExtractor())
    try:
        yield [ds.direct_extract(extr.DataExtractor(ignore_indexing=True), s)["images"] for s in range(3)]
    finally:
        ds.close()


@pytest.mark.parametrize(
    ("indexing", "per_subject"),
    [
        (extr.PatchWiseIndexing((8, 10, 16), stride=(6, 7, 16)), 3 * 3 * 1),  # 0,6,12 | 0,7,14 | 0
        (extr.PatchWiseIndexing((8, 10, 16), overlap=0.5), 4 * 4 * 1),  # 0,4,8,12 | 0,5,10,14 | 0
        (extr.PatchWiseIndexing((7, 7, 7), stride=7), 3 * 4 * 3),  # 0,7,13 | 0,7,14,17 | 0,7,9
        (extr.PatchWiseIndexing((24, 24), ignore_incomplete=False, stride=(12, 12)), 1 * 1),  # axis 0 clamped
        (extr.PatchWiseIndexing((5, 30), ignore_incomplete=False, stride=(5, 30)), 4 * 1),
    ],
    ids=["stride", "overlap", "stride-equals-patch", "clamped", "clamped-2d"],
)
def test_overlapping_samples_are_slices_of_the_volume(
    client: pw.Client, full_images: list[np.ndarray], indexing: extr.PatchWiseIndexing, per_subject: int
) -> None:
    extractor = extr.ComposeExtractor([extr.DataExtractor(), extr.IndexingExtractor()])
    ds = client.datasource("tiny", indexing, extractor)
    try:
        assert len(ds) == 3 * per_subject
        covered = [np.zeros(TINY_SHAPE[: len(indexing.patch_shape)], dtype=bool) for _ in range(3)]
        for i in range(len(ds)):
            sample = ds[i]
            subject, expr = sample["subject_index"], sample["index_expr"].expression
            assert i // per_subject == subject
            np.testing.assert_array_equal(sample["images"], full_images[subject][expr])
            assert sample["images"].dtype == full_images[subject].dtype
            covered[subject][expr] = True
        assert all(c.all() for c in covered)
    finally:
        ds.close()


@pytest.mark.parametrize(
    ("indexing", "fragment"),
    [
        (extr.PatchWiseIndexing((8, 8, 8), stride=0), "stride 0 on axis 0"),
        (extr.PatchWiseIndexing((8, 8, 8), stride=(4, 9, 4)), "stride 9 on axis 1"),
        (extr.PatchWiseIndexing((8, 8, 8), stride=(4, 4)), "2 values for 3 patch axes"),
    ],
    ids=["zero", "above-patch", "wrong-length"],
)
def test_bad_stride_is_invalid_argument(client: pw.Client, indexing: extr.IndexingStrategy, fragment: str) -> None:
    with pytest.raises(pw.InvalidArgumentError) as info:
        client.datasource("tiny", indexing, extr.DataExtractor())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "indexing_strategy.patch_wise.stride" in str(info.value)
    assert fragment in str(info.value)


# -- blending weights ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (8, 5), (4, 9, 6), (16, 16, 16)])
def test_gaussian_is_symmetric_with_max_one_at_the_centre(shape: tuple[int, ...]) -> None:
    w = gaussian_weights(shape)
    assert w.shape == shape
    assert w.dtype == np.float32
    for axis in range(len(shape)):
        np.testing.assert_array_equal(w, np.flip(w, axis))
    assert w.max() == 1.0
    centre = tuple(s // 2 for s in shape)
    assert w[centre] == 1.0
    assert w.min() > 0
    assert w.min() >= np.float32(MIN_WEIGHT)


def test_gaussian_values() -> None:
    # size 5, sigma 5/8 at offsets 0, 1, 2: exp(-x**2 / (2 * 0.625**2))
    w = gaussian_weights((5,))
    expected = np.exp(-np.array([4.0, 1.0, 0.0, 1.0, 4.0]) / (2 * 0.625**2))
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_allclose(gaussian_weights((5, 3)), np.outer(w, gaussian_weights((3,))), rtol=1e-6)
    wide = gaussian_weights((5,), sigma_scale=1.0)
    assert wide[0] > w[0]  # a wider Gaussian weighs the border more
    tiny = gaussian_weights((64,), sigma_scale=0.01)
    assert tiny.min() == np.float32(MIN_WEIGHT)  # clamped below, never 0


def test_gaussian_is_cached_and_read_only() -> None:
    w = gaussian_weights((6, 4, 2))
    assert gaussian_weights((6, 4, 2)) is w
    assert gaussian_weights([6, 4, 2], 1 / 8, "float32") is w
    assert gaussian_weights((6, 4, 2), dtype=np.float64) is not w
    assert gaussian_weights((6, 4, 2), dtype=np.float64).dtype == np.float64
    assert not w.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0, 0] = 2.0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (((),), "positive sizes"),
        (((4, 0),), "positive sizes"),
        (((4, 2.5),), "integers"),
        (((4,), 0.0), "sigma_scale"),
        (((4,), 1 / 8, np.int32), "floating"),
    ],
)
def test_gaussian_rejects_bad_parameters(args: tuple, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        gaussian_weights(*args)


def test_region_weights() -> None:
    assert region_weights((8, 8, 8), "overwrite") is None
    assert region_weights((8, 8, 8), "average") is None
    assert region_weights((8, 8, 8), "gaussian") is gaussian_weights((8, 8, 8))
    border = region_weights((8, 3, 8), "gaussian")  # a clamped border patch gets its own, full Gaussian
    assert border is not None
    assert border.shape == (8, 3, 8)
    assert border[4, 1, 4] == 1.0
    with pytest.raises(ValueError, match="unknown blend mode 'median'"):
        region_weights((8, 8, 8), "median")
