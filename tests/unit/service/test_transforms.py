"""The server's transforms, compiled from their specs, against pymia's on the same sample (no server, no file)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from patchwire.client import transformation as tfm
from patchwire.service._errors import InvalidArgument, ResourceExhausted
from patchwire.service._extraction import MAX_NESTING
from patchwire.service._transforms import compile_transform, writes_in_place
from patchwire.v1 import spec_pb2

from _pymia_oracle import load_pymia

pm = load_pymia()


def sample() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    return {
        "images": rng.normal(100, 30, (6, 8, 5, 2)).astype(np.float32),
        "labels": rng.integers(0, 4, (6, 8, 5, 1)).astype(np.uint8),
        "mask": (rng.random((6, 8, 5, 1)) > 0.3).astype(np.uint8),
        "subject": "s0",
    }


CASES = [
    ("permute", lambda lib: lib.Permute((2, 0, 1, 3), entries=("images",))),
    ("squeeze", lambda lib: lib.Squeeze(entries=("labels", "mask"))),
    ("unsqueeze", lambda lib: lib.UnSqueeze(0, entries=("images",))),
    ("reshape", lambda lib: lib.Reshape({"images": (-1, 2)})),
    ("normalize-loop", lambda lib: lib.IntensityNormalization(loop_axis=-1)),
    ("rescale", lambda lib: lib.IntensityRescale(-1.0, 1.0)),
    ("clip", lambda lib: lib.ClipPercentile(95, 5, loop_axis=-1)),
    ("relabel", lambda lib: lib.Relabel({1: 3, 3: 1}, entries=("labels",))),
    ("size-correction", lambda lib: lib.SizeCorrection((4, 11), pad_value=2)),
    ("mask", lambda lib: lib.Mask("mask", 1, 7.0, entries=("labels",))),
    (
        "compose",
        lambda lib: lib.ComposeTransform([lib.Squeeze(entries=("mask",)), lib.IntensityNormalization(loop_axis=-1)]),
    ),
]


@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
def test_transform_equals_pymias(name: str, make: Any) -> None:
    ours = compile_transform(make(tfm)._to_proto())(sample())
    theirs = make(pm.transformation)(sample())
    assert ours.keys() == theirs.keys()
    for key in theirs:
        if isinstance(theirs[key], np.ndarray):
            assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
        else:
            assert ours[key] == theirs[key], key


def test_an_empty_spec_and_a_bad_permutation_are_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument, match="transform: no transform is set"):
        compile_transform(spec_pb2.Transform())
    with pytest.raises(InvalidArgument, match=r"transform\.permute\.permutation: \(0, 0\) is not a permutation"):
        compile_transform(spec_pb2.Transform(permute=spec_pb2.Permute(permutation=[0, 0])))


def test_nesting_is_bounded_before_recursing() -> None:
    spec = spec_pb2.Transform(squeeze=spec_pb2.Squeeze())
    for _ in range(MAX_NESTING + 1):
        spec = spec_pb2.Transform(compose=spec_pb2.ComposeTransform(transforms=[spec]))
    with pytest.raises(InvalidArgument, match=f"ComposeTransform may be nested at most {MAX_NESTING} deep"):
        compile_transform(spec)


def test_size_correction_is_bounded_by_max_bytes() -> None:
    transform = compile_transform(tfm.SizeCorrection((600, 600))._to_proto(), max_bytes=1 << 20)
    with pytest.raises(ResourceExhausted):
        transform(sample())


@pytest.mark.parametrize(
    ("make", "writes"),
    [
        (lambda: tfm.Permute((2, 0, 1)), False),
        (lambda: tfm.Squeeze(), False),
        (lambda: tfm.UnSqueeze(0), False),
        (lambda: tfm.Reshape({"images": (-1, 2)}), False),
        (lambda: tfm.SizeCorrection((4, 11)), False),
        (lambda: tfm.IntensityNormalization(), False),
        (lambda: tfm.IntensityNormalization(loop_axis=-1), True),
        (lambda: tfm.IntensityRescale(0.0, 1.0, loop_axis=0), True),
        (lambda: tfm.ClipPercentile(95), True),
        (lambda: tfm.Relabel({1: 2}), True),
        (lambda: tfm.Mask("mask"), True),
        (lambda: tfm.ComposeTransform([tfm.Permute((2, 0, 1)), tfm.Squeeze()]), False),
        (lambda: tfm.ComposeTransform([tfm.Permute((2, 0, 1)), tfm.Relabel({1: 2})]), True),
    ],
)
def test_which_transforms_write_into_their_sample(make: Any, writes: bool) -> None:
    """Samples for a transform that never writes into its arrays are cut from the cached blocks without copies."""
    assert writes_in_place(make()._to_proto()) is writes


def test_a_view_transform_leaves_read_only_input_untouched() -> None:
    original = sample()
    frozen = {k: v for k, v in original.items()}
    for value in frozen.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # as views of the server's cached blocks are
    spec = tfm.ComposeTransform([tfm.Permute((2, 0, 1, 3)), tfm.SizeCorrection((4, 11)), tfm.Squeeze()])._to_proto()
    assert not writes_in_place(spec)
    out = compile_transform(spec)(dict(frozen))
    theirs = pm.transformation.ComposeTransform(
        [
            pm.transformation.Permute((2, 0, 1, 3)),
            pm.transformation.SizeCorrection((4, 11)),
            pm.transformation.Squeeze(),
        ]
    )(sample())
    for key in ("images", "labels"):
        np.testing.assert_array_equal(out[key], theirs[key])
