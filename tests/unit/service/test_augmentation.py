"""The server's random transforms, compiled from the client's specs and run on read-only samples (no server, no
file): shapes, dtypes and label sets kept, images and labels moved together, p, determinism, validation, and pymia's
outcomes where pymia has the transform."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from patchwire.client import augmentation as aug
from patchwire.client import transformation as tfm
from patchwire.service._augmentation import AUGMENTATIONS, RandomStep, _elastic_warp, compile_augmentation
from patchwire.service._errors import InvalidArgument, ResourceExhausted
from patchwire.service._randomness import Draw
from patchwire.service._transforms import compile_transform, writes_in_place
from patchwire.v1 import spec_pb2

from _pymia_oracle import load_pymia

SHAPE = (12, 12, 6)
LABELS = (0, 1, 2, 3)


def sample(shape: tuple[int, ...] = SHAPE, seed: int = 5) -> dict[str, Any]:
    """Read-only arrays (as the cache hands them out): images whose channels are the label map times 10 and 20."""
    labels = np.random.default_rng(seed).integers(0, 4, (*shape, 1)).astype(np.uint8)
    images = np.concatenate([labels * 10.0, labels * 20.0], axis=-1).astype(np.float32)
    for arr in (labels, images):
        arr.setflags(write=False)
    return {"images": images, "labels": labels, "subject": "s0"}


def step(transform: aug.RandomTransform, max_bytes: int | None = None) -> RandomStep:
    msg = transform._to_proto()
    kind = msg.WhichOneof("transform")
    assert kind is not None
    return compile_augmentation(kind, getattr(msg, kind), f"transform.{kind}", max_bytes)


def run(transform: aug.RandomTransform, seed: int = 0, given: dict[str, Any] | None = None) -> dict[str, Any]:
    return step(transform)(sample() if given is None else given, np.random.default_rng(seed))


def key(out: dict[str, Any]) -> bytes:
    return b"".join(out[k].tobytes() + str(out[k].shape).encode() for k in ("images", "labels"))


# every spatial transform, resampling images nearest-neighbour so that they must equal their label maps times 10
ALIGNED: dict[str, Any] = {
    "crop": lambda: aug.RandomCrop((8, 7, 4)),
    "mirror": lambda: aug.RandomMirror(axis=0),
    "rotation90": lambda: aug.RandomRotation90(axes=(0, 1)),
    "shift": lambda: aug.RandomShift((0.3, 0.4)),
    "elastic-deformation": lambda: aug.RandomElasticDeformation(
        deformation_sigma=2.0, interpolators=("nearest", "nearest"), spatial_rank=3, p=1.0
    ),
    "flip": lambda: aug.RandomFlip(),
    "affine": lambda: aug.RandomAffine(scales=(0.8, 1.2), degrees=20, translation=2, interpolation="nearest"),
    "elastic": lambda: aug.RandomElastic(num_control_points=6, max_displacement=3.0, interpolation="nearest"),
}
# the spatial transforms that interpolate images, with their defaults
SMOOTH: dict[str, Any] = {
    "elastic-deformation": lambda: aug.RandomElasticDeformation(spatial_rank=3, p=1.0),
    "affine": lambda: aug.RandomAffine(),
    "elastic": lambda: aug.RandomElastic(),
}
INTENSITY: dict[str, Any] = {
    "gamma": lambda: aug.RandomGamma(),
    "noise": lambda: aug.RandomNoise(),
    "bias-field": lambda: aug.RandomBiasField(),
    "scale-shift": lambda: aug.RandomIntensityScaleShift(),
}
ALL = {**ALIGNED, **{f"{k}-smooth": v for k, v in SMOOTH.items()}, **INTENSITY}


def test_every_random_transform_of_the_spec_is_implemented() -> None:
    oneof = spec_pb2.Transform.DESCRIPTOR.oneofs_by_name["transform"]
    assert {f.name for f in oneof.fields if f.name.startswith("random_")} == AUGMENTATIONS
    assert {make()._to_proto().WhichOneof("transform") for make in ALL.values()} == AUGMENTATIONS
    for make in ALL.values():  # random transforms make new arrays: cached blocks may be read in place
        assert not writes_in_place(make()._to_proto())


@pytest.mark.parametrize("name", sorted(ALIGNED))
def test_spatial_transforms_move_images_and_labels_together(name: str) -> None:
    for seed in range(6):
        out = run(ALIGNED[name](), seed)
        labels, images = out["labels"], out["images"]
        assert labels.dtype == np.uint8 and images.dtype == np.float32
        assert images.shape[:-1] == labels.shape[:-1] and images.shape[-1] == 2
        expected = (8, 7, 4, 1) if name == "crop" else (*SHAPE, 1)
        assert labels.shape == expected
        assert set(np.unique(labels)) <= set(LABELS)
        np.testing.assert_array_equal(images[..., :1], labels * 10.0)
        np.testing.assert_array_equal(images[..., 1:], labels * 20.0)


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_label_maps_are_resampled_nearest_neighbour_whatever_the_interpolation(name: str) -> None:
    for seed in range(4):
        out = run(SMOOTH[name](), seed)
        assert out["labels"].dtype == np.uint8 and out["labels"].shape == (*SHAPE, 1)
        assert set(np.unique(out["labels"])) <= set(LABELS)
        assert out["images"].dtype == np.float32 and out["images"].shape == (*SHAPE, 2)
        # interpolated: values between the labels' multiples of ten appear
        assert not np.isin(out["images"][..., 0], np.array(LABELS) * 10.0).all()


@pytest.mark.parametrize("name", sorted(INTENSITY))
def test_intensity_transforms_change_images_only(name: str) -> None:
    given = sample()
    out = run(INTENSITY[name](), 3, given)
    assert out["labels"] is given["labels"]
    assert out["images"].dtype == np.float32 and out["images"].shape == given["images"].shape
    assert not np.array_equal(out["images"], given["images"])


@pytest.mark.parametrize("name", sorted(ALL))
def test_inputs_are_never_written_and_outputs_are_new_arrays(name: str) -> None:
    given = sample()
    copies = {k: v.copy() for k, v in given.items() if isinstance(v, np.ndarray)}
    out = run(ALL[name](), 1, given)  # writing into the read-only inputs would raise
    for k, original in copies.items():
        np.testing.assert_array_equal(given[k], original)
        if out[k] is not given[k]:
            assert not np.shares_memory(out[k], given[k]), k
    assert out["subject"] == "s0" and out is not given


@pytest.mark.parametrize("name", sorted(ALL))
def test_p_zero_leaves_the_sample_as_it_is(name: str) -> None:
    transform = ALL[name]()
    transform.p = 0.0
    given = sample()
    for seed in range(20):
        out = run(transform, seed, given)
        assert all(out[k] is given[k] for k in given)


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_generator_seed_fixes_the_outcome_and_seeds_vary_it(name: str) -> None:
    transform = ALL[name]()
    if name == "mirror":
        transform.p = 0.5  # its only draw
    assert key(run(transform, 7)) == key(run(transform, 7))
    assert len({key(run(transform, seed)) for seed in range(8)}) > 1


def test_p_is_the_probability_of_a_transform() -> None:
    transform = aug.RandomMirror(axis=0, p=0.3)
    given = sample()
    applied = sum(run(transform, seed, given)["labels"] is not given["labels"] for seed in range(400))
    assert 80 <= applied <= 160
    assert aug.RandomElasticDeformation()._to_proto().random_elastic_deformation.p == 0.5  # pymia's default


def test_a_chain_draws_from_the_sample_draw_each_transform_from_its_own_generator() -> None:
    chain = compile_transform(
        tfm.ComposeTransform(
            [aug.RandomFlip(axes=(0, 1, 2)), tfm.Squeeze(entries=()), aug.RandomNoise(std=0.5)]
        )._to_proto()
    )
    first = chain(sample(), Draw(3, 1, 10, 10))
    assert key(first) == key(chain(sample(), Draw(3, 1, 10, 10)))
    assert key(first) != key(chain(sample(), Draw(3, 2, 10, 10)))  # another epoch
    assert key(first) != key(chain(sample(), Draw(4, 1, 10, 10)))  # another seed
    assert key(first) != key(chain(sample(), Draw(3, 1, 11, 10)))  # another position


def test_spatial_transforms_keep_every_dtype() -> None:
    labels = sample()["labels"]
    given = {
        "b": labels > 1,
        "i": labels.astype(np.int16) - 2,
        "h": labels.astype(np.float16),
        "d": labels.astype(np.float64),
    }
    entries = tuple(given)
    for transform in (
        aug.RandomRotation90(axes=(0, 1), entries=entries),
        aug.RandomAffine(degrees=30, interpolation="bspline", entries=entries),
        aug.RandomElastic(max_displacement=4.0, entries=entries),
        aug.RandomElasticDeformation(interpolators=("linear",) * 4, spatial_rank=3, p=1.0, entries=entries),
    ):
        out = run(transform, 2, given)
        for k, arr in given.items():
            assert out[k].dtype == arr.dtype and out[k].shape == arr.shape, (type(transform).__name__, k)
        assert set(np.unique(out["i"])) <= {-2, -1, 0, 1}  # nearest-neighbour; fill value 0 is a label
    out = run(aug.RandomNoise(entries=("h", "d")), 2, given)
    assert out["h"].dtype == np.float16 and out["d"].dtype == np.float64


def test_spatial_axes_choose_what_moves() -> None:
    flat = {"images": np.repeat(sample()["images"][:, :, :1], SHAPE[2], axis=2)}

    def constant_along_axis_2(arr: np.ndarray) -> bool:
        return all(np.array_equal(arr[:, :, 0], arr[:, :, i]) for i in range(SHAPE[2]))

    in_plane = run(aug.RandomAffine(scales=0, degrees=(30, 30), spatial_axes=(0, 1), entries=("images",)), 0, flat)
    assert constant_along_axis_2(in_plane["images"]) and not np.array_equal(in_plane["images"], flat["images"])
    about_axis_0 = run(aug.RandomAffine(scales=0, degrees=(30, 30, 0, 0, 0, 0), entries=("images",)), 0, flat)
    assert not constant_along_axis_2(about_axis_0["images"])


def test_affine_identity_ranges_change_nothing_and_a_translation_moves_content() -> None:
    given = sample()
    same = run(aug.RandomAffine(scales=0, degrees=0, translation=0), 0, given)
    np.testing.assert_array_equal(same["images"], given["images"])
    moved = run(aug.RandomAffine(scales=0, degrees=0, translation=(2, 2, 0, 0, 0, 0), interpolation="nearest"), 0)
    np.testing.assert_array_equal(moved["labels"][2:], given["labels"][:-2])
    assert not moved["labels"][:2].any()  # fill value


def test_bias_field_is_smooth_and_positive() -> None:
    given = {"images": np.ones((16, 16, 16, 1), np.float32)}
    out = run(aug.RandomBiasField(coefficients=0.5, order=2, entries=("images",)), 4, given)["images"]
    assert (out > 0).all() and not np.allclose(out, 1.0)
    assert np.abs(np.diff(out, axis=0)).max() < 0.5  # a low-order polynomial's exp


def test_gamma_and_scale_shift_follow_their_formulas() -> None:
    given = {"images": np.linspace(-2, 2, 40, dtype=np.float32).reshape(2, 20, 1)}
    out = run(aug.RandomGamma(log_gamma=(0.5, 0.5), entries=("images",)), 0, given)["images"]
    x = given["images"]
    np.testing.assert_allclose(out, np.sign(x) * np.abs(x) ** math.exp(0.5), rtol=1e-5)
    out = run(aug.RandomIntensityScaleShift(scale=(0.5, 0.5), shift=(1, 1), entries=("images",)), 0, given)["images"]
    np.testing.assert_allclose(out, x * 1.5 + 1, rtol=1e-6)
    noise = run(aug.RandomNoise(mean=3.0, std=(0.0, 0.0), entries=("images",)), 0, given)["images"]
    np.testing.assert_allclose(noise, x + 3.0, rtol=1e-6)


# -- validation -------------------------------------------------------------------------------------------------------

S = spec_pb2
R = spec_pb2.Range
INVALID = [
    (S.Transform(random_crop=S.RandomCrop()), r"random_crop\.shape: give 1"),
    (S.Transform(random_crop=S.RandomCrop(shape=[0])), r"random_crop\.shape: sizes must lie in"),
    (S.Transform(random_crop=S.RandomCrop(shape=[1 << 20])), r"random_crop\.shape: sizes must lie in"),
    (S.Transform(random_crop=S.RandomCrop(shape=[4, 4], axis=[0])), r"random_crop\.axis: give one axis per size"),
    (S.Transform(random_crop=S.RandomCrop(shape=[4], axis=[99])), r"random_crop\.axis: axis 99 is out of"),
    (S.Transform(random_mirror=S.RandomMirror(axis=1000)), r"random_mirror\.axis: axis 1000"),
    (S.Transform(random_mirror=S.RandomMirror(entries=["a", "a"])), r"random_mirror\.entries: 'a' is listed twice"),
    (S.Transform(random_rotation90=S.RandomRotation90(axes=[0])), r"random_rotation90\.axes: give the two axes"),
    (S.Transform(random_rotation90=S.RandomRotation90(axes=[1, 1])), r"random_rotation90\.axes: axes must differ"),
    (S.Transform(random_shift=S.RandomShift(shift=[1.5])), r"random_shift\.shift: must lie in \[0, 1\]"),
    (S.Transform(random_shift=S.RandomShift(shift=[math.nan])), r"random_shift\.shift: must lie in"),
    (S.Transform(random_shift=S.RandomShift()), r"random_shift\.shift: give 1"),
    (
        S.Transform(random_elastic_deformation=S.RandomElasticDeformation(num_control_points=1000)),
        r"random_elastic_deformation\.num_control_points: must lie in \[2, 64\]",
    ),
    (
        S.Transform(random_elastic_deformation=S.RandomElasticDeformation(num_control_points=4, deformation_sigma=-1)),
        r"random_elastic_deformation\.deformation_sigma: must lie in",
    ),
    (
        S.Transform(
            random_elastic_deformation=S.RandomElasticDeformation(
                num_control_points=4, interpolators=[1], entries=["a", "b"]
            )
        ),
        r"random_elastic_deformation\.interpolators: give one per entry \(2\)",
    ),
    (
        S.Transform(
            random_elastic_deformation=S.RandomElasticDeformation(
                num_control_points=4, interpolators=[9], entries=["a"]
            )
        ),
        r"random_elastic_deformation\.interpolators\[0\]: unknown interpolation 9",
    ),
    (
        S.Transform(
            random_elastic_deformation=S.RandomElasticDeformation(num_control_points=4, spatial_axes=[0, 1, 2, 3])
        ),
        r"random_elastic_deformation\.spatial_axes: at most 3 axes",
    ),
    (
        S.Transform(random_elastic_deformation=S.RandomElasticDeformation(num_control_points=4, p=1.5)),
        r"random_elastic_deformation\.p: a probability must lie in \[0, 1\]",
    ),
    (S.Transform(random_flip=S.RandomFlip(flip_probability=1.5)), r"random_flip\.flip_probability: a probability"),
    (S.Transform(random_flip=S.RandomFlip(p=math.nan)), r"random_flip\.p: a probability"),
    (S.Transform(random_affine=S.RandomAffine(scales=[R(low=0, high=1)])), r"random_affine\.scales\[0\]\.low"),
    (S.Transform(random_affine=S.RandomAffine(degrees=[R(low=5, high=1)])), r"random_affine\.degrees\[0\]: low"),
    (S.Transform(random_affine=S.RandomAffine(translation=[R()] * 4)), r"random_affine\.translation: give one"),
    (
        S.Transform(random_affine=S.RandomAffine(translation=[R(low=0, high=math.inf)])),
        r"random_affine\.translation\[0\]\.high",
    ),
    (S.Transform(random_affine=S.RandomAffine(interpolation=42)), r"random_affine\.interpolation: unknown"),
    (S.Transform(random_affine=S.RandomAffine(fill_value=math.nan)), r"random_affine\.fill_value"),
    (S.Transform(random_elastic=S.RandomElastic(num_control_points=3)), r"random_elastic\.num_control_points"),
    (S.Transform(random_elastic=S.RandomElastic(num_control_points=10**6)), r"random_elastic\.num_control_points"),
    (S.Transform(random_elastic=S.RandomElastic(max_displacement=math.inf)), r"random_elastic\.max_displacement"),
    (S.Transform(random_gamma=S.RandomGamma(log_gamma=R(low=-100, high=0))), r"random_gamma\.log_gamma\.low"),
    (S.Transform(random_noise=S.RandomNoise(std=R(low=-1, high=1))), r"random_noise\.std\.low"),
    (S.Transform(random_noise=S.RandomNoise(mean=math.inf)), r"random_noise\.mean"),
    (S.Transform(random_bias_field=S.RandomBiasField(order=100)), r"random_bias_field\.order: must lie in \[0, 8\]"),
    (S.Transform(random_bias_field=S.RandomBiasField(coefficients=-1)), r"random_bias_field\.coefficients"),
    (
        S.Transform(random_intensity_scale_shift=S.RandomIntensityScaleShift(scale=R(low=1, high=0))),
        r"random_intensity_scale_shift\.scale: low \(1\.0\) must not exceed high",
    ),
]


@pytest.mark.parametrize(("spec", "message"), INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_specs_are_refused_naming_the_field(spec: spec_pb2.Transform, message: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^transform\." + message):
        compile_transform(spec)


RUNTIME = [
    (aug.RandomCrop((20,)), r"random_crop \(entries images, labels\): a crop of 20 along axis 0 does not fit"),
    (aug.RandomRotation90(axes=(0, 2)), r"random_rotation90 .*: the plane of axes \(0, 2\) must be square"),
    (aug.RandomMirror(axis=7), r"random_mirror .*: axis 7 is out of bounds for entry 'images'"),
    (aug.RandomGamma(entries=("labels",)), r"random_gamma .*: RandomGamma changes intensities of floating entries"),
    (aug.RandomFlip(entries=("images", "other")), r"random_flip .*: entries must have the same size"),
    (aug.RandomFlip(entries=("subject",)), r"random_flip .*: entry 'subject' must be 'ndarray'"),
    (aug.RandomAffine(entries=("images", "five_d")), r"random_affine .*: entry 'five_d' .* has 4 spatial axes"),
    (
        aug.RandomFlip(entries=("absent",), p=0.0),
        r'random_flip .*: Transform can not be applied because entry "absent" was',
    ),
]


@pytest.mark.parametrize(("transform", "message"), RUNTIME, ids=[str(i) for i in range(len(RUNTIME))])
def test_what_a_sample_cannot_take_is_an_invalid_argument(transform: aug.RandomTransform, message: str) -> None:
    given = {**sample(), "other": np.zeros((5, 12, 6, 1), np.float32), "five_d": np.zeros((*SHAPE, 1, 1), np.uint8)}
    with pytest.raises(InvalidArgument, match=r"^transform\." + message):
        compile_transform(transform._to_proto())(given)


def test_an_elastic_field_is_bounded_by_max_bytes() -> None:
    transform = compile_transform(aug.RandomElastic()._to_proto(), max_bytes=10_000)
    with pytest.raises(ResourceExhausted, match="elastic displacement field"):
        transform(sample())


# -- the client's parameters -------------------------------------------------------------------------------------------


def test_the_client_takes_torchio_and_pymia_parameter_forms() -> None:
    affine = aug.RandomAffine(scales=0.1, degrees=(1, 2, 3, 4, 5, 6), translation=0)._to_proto().random_affine
    assert [(r.low, r.high) for r in affine.scales] == [(pytest.approx(0.9), pytest.approx(1.1))]
    assert [(r.low, r.high) for r in affine.degrees] == [(1, 2), (3, 4), (5, 6)]
    assert not affine.translation
    crop = aug.RandomCrop((None, 8, 4), axis=(1, 2, 0))._to_proto().random_crop
    assert list(crop.shape) == [8, 4] and list(crop.axis) == [2, 0]
    elastic = aug.RandomElasticDeformation(num_control_points=1, deformation_sigma=0.5, interpolators=(23, 1))
    proto = elastic._to_proto().random_elastic_deformation
    assert (proto.num_control_points, proto.deformation_sigma) == (2, 1.0)  # pymia's minimums
    assert list(proto.interpolators) == [spec_pb2.INTERPOLATION_BSPLINE, spec_pb2.INTERPOLATION_NEAREST]
    assert list(proto.spatial_axes) == [0, 1]
    noise = aug.RandomNoise(std=0.1)._to_proto().random_noise
    assert (noise.std.low, noise.std.high) == (0.0, pytest.approx(0.1))
    for bad in (
        lambda: aug.RandomMirror(p=2.0),
        lambda: aug.RandomRotation90(axes=(0,)),
        lambda: aug.RandomCrop((4, 4), axis=0),
        lambda: aug.RandomElasticDeformation(interpolators=("bspline",)),
        lambda: aug.RandomAffine(interpolation="cubic"),
        lambda: aug.RandomAffine(scales=(0, 1)),
        lambda: aug.RandomElastic(num_control_points=3),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError, match="runs on the server"):
        aug.RandomFlip()(sample())


# -- pymia's outcomes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pymia_augmentation() -> Any:
    load_pymia()  # restores the NumPy aliases pymia needs
    import pymia.data.augmentation

    return pymia.data.augmentation


def _writable(given: dict[str, Any]) -> dict[str, Any]:
    """Copies of the arrays (pymia writes into them)."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in given.items()}


def _pymia_outcomes(transform: Any, given: dict[str, Any], seeds: int = 200) -> set[bytes]:
    state = np.random.get_state()
    try:
        outcomes = set()
        for seed in range(seeds):
            np.random.seed(seed)
            outcomes.add(key(transform(_writable(given))))
        return outcomes
    finally:
        np.random.set_state(state)


def test_mirror_equals_pymias(pymia_augmentation: Any) -> None:
    given = sample()
    theirs = pymia_augmentation.RandomMirror(axis=-2)(_writable(given))
    assert key(run(aug.RandomMirror(), 0, given)) == key(theirs)


def test_rotation90_gives_pymias_three_outcomes(pymia_augmentation: Any) -> None:
    given = sample()
    theirs = _pymia_outcomes(pymia_augmentation.RandomRotation90(axes=(0, 1)), given, 60)
    ours = {key(run(aug.RandomRotation90(axes=(0, 1)), seed, given)) for seed in range(60)}
    assert ours == theirs and len(ours) == 3


def test_shift_gives_pymias_outcomes(pymia_augmentation: Any) -> None:
    given = sample((10, 4, 3))
    theirs = _pymia_outcomes(pymia_augmentation.RandomShift((0.3,)), given)
    ours = {key(run(aug.RandomShift(0.3), seed, given)) for seed in range(200)}
    assert ours == theirs and len(ours) == 6  # rolls -3 .. 2


def test_crop_gives_pymias_outcomes_and_the_last_anchor_too(pymia_augmentation: Any) -> None:
    given = sample((6, 4, 3))
    theirs = _pymia_outcomes(pymia_augmentation.RandomCrop(4), given)
    ours = {key(run(aug.RandomCrop(4), seed, given)) for seed in range(200)}
    last = {k: v[2:] for k, v in given.items() if isinstance(v, np.ndarray)}
    assert len(theirs) == 2 and ours == theirs | {key(last)}  # pymia never crops at anchor 2
    whole = run(aug.RandomCrop(6), 0, given)  # pymia fails on a crop of the whole axis
    assert key(whole) == key(given)


def test_elastic_deformation_equals_pymias_for_pymias_draws(pymia_augmentation: Any) -> None:
    """pymia's field (SimpleITK's B-spline transform) and nearest-neighbour resampling, from the control-point
    displacements pymia drew: the same arrays."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    given = {
        "images": rng.normal(size=(20, 24, 2)).astype(np.float32),
        "labels": rng.integers(0, 4, (20, 24, 1)).astype(np.uint8),
    }
    nearest = (sitk.sitkNearestNeighbor, sitk.sitkNearestNeighbor)
    theirs_transform = pymia_augmentation.RandomElasticDeformation(4, 3.0, nearest, 2, 0.0, 1.0)
    state = np.random.get_state()
    try:
        np.random.seed(5)
        theirs = theirs_transform(_writable(given))
        np.random.seed(5)
        np.random.random()  # pymia's p draw
        params = np.random.randn(2 * 7 * 7) * 3.0
    finally:
        np.random.set_state(state)
    # SimpleITK's parameters: the x (array axis 1) displacements of the grid, then the y ones, x fastest
    coefficients = np.stack([params[49:].reshape(7, 7), params[:49].reshape(7, 7)]).astype(np.float32)
    ours = _elastic_warp(
        [given["images"], given["labels"]], [(0, 1), (0, 1)], (20, 24), coefficients, 4, [0, 0], 0.0, None
    )
    assert not np.array_equal(ours[1], given["labels"])
    np.testing.assert_array_equal(ours[0], theirs["images"])
    np.testing.assert_array_equal(ours[1], theirs["labels"])
