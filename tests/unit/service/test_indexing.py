"""The server's indexing strategies, compiled from their specs, against pymia's: the same number of samples and the
same index expressions, in the same order, for every strategy and a few shapes."""

from __future__ import annotations

from typing import Any

import pytest

from patchwire.client import extraction as extr
from patchwire.service._errors import InvalidArgument
from patchwire.service._indexing import compile_indexing
from patchwire.v1 import spec_pb2

from _pymia_oracle import load_pymia

pm = load_pymia()
SHAPES = [(6, 7, 5), (6, 7, 5, 2), (9, 4, 3)]
CASES = [
    ("empty", lambda lib: lib.EmptyIndexing()),
    ("slice", lambda lib: lib.SliceIndexing()),
    ("slice-axis-2", lambda lib: lib.SliceIndexing(2)),
    ("slice-axes-0-1", lambda lib: lib.SliceIndexing((0, 1))),
    ("patches", lambda lib: lib.PatchWiseIndexing((2, 3))),
    ("patches-incomplete", lambda lib: lib.PatchWiseIndexing((4, 4), ignore_incomplete=False)),
    ("voxels", lambda lib: lib.VoxelWiseIndexing()),
    ("voxels-2d", lambda lib: lib.VoxelWiseIndexing(image_dimension=2)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
def test_expressions_equal_pymias(name: str, make: Any, shape: tuple[int, ...]) -> None:
    ours = compile_indexing(make(extr)._to_proto())
    try:
        theirs = make(pm.extraction)(shape)
    except (ValueError, IndexError):  # pymia cannot index this shape this way: neither do we
        with pytest.raises(InvalidArgument):
            ours.validate(shape, "images")
        return
    ours.validate(shape, "images")
    assert ours.count(shape) == len(theirs)
    assert [ours.expression(shape, k) for k in range(len(theirs))] == [e.expression for e in theirs]


def test_no_strategy_is_empty_indexing() -> None:
    assert compile_indexing(None).count((3, 4)) == 1
    assert compile_indexing(spec_pb2.IndexingStrategy()).count((3, 4)) == 1


@pytest.mark.parametrize(
    ("strategy", "shape", "fragment"),
    [
        (spec_pb2.IndexingStrategy(slice=spec_pb2.SliceIndexing(slice_axis=[5])), (3, 4), "axis"),
        (spec_pb2.IndexingStrategy(patch_wise=spec_pb2.PatchWiseIndexing(patch_shape=[0, 2])), (3, 4), "patch"),
        # pymia indexes whatever comes out of a 2-D array voxel by voxel in three dimensions; refused here
        (spec_pb2.IndexingStrategy(voxel_wise=spec_pb2.VoxelWiseIndexing(image_dimension=3)), (4, 9), "exceeds"),
    ],
)
def test_bad_strategies_are_invalid_arguments(
    strategy: spec_pb2.IndexingStrategy, shape: tuple[int, ...], fragment: str
) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        compile_indexing(strategy).validate(shape, "images")
