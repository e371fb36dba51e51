"""Bit-for-bit parity with pymia 0.3.4: every sample fetched through a real (in-process) server equals what
``pymia.data.extraction.PymiaDatasource`` returns for the same HDF5 file, spec and sample index.

Each case is written once as a function of a *library* (patchwire's ``extraction``/``transformation`` modules or
pymia's); both sides are built from it and compared sample by sample, in order, with a fresh pymia datasource per
comparison (pymia's PadDataExtractor rewrites the datasource's index expressions in place, and its extractors
cache state). Compared are keys, types, dtypes, shapes and values; see :func:`assert_same`.

Where pymia 0.3.4 itself fails (documented bugs) nothing is compared; the tests at the end pin patchwire's
better-defined behaviour there instead, checked against arrays computed by hand with numpy.

Long because the cases are the oracle's list: one line per indexing, extractor and transform combination that pymia
defines, all compared against one module-scoped server.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.client.conversion import ImageProperties
from patchwire.client.indexexpression import IndexExpression
from patchwire.service import PatchwireServer
from patchwire.service._extraction import derive_seed

from _pymia_oracle import load_pymia

pm = load_pymia()

SEED = 20240611
"""Seed of every RandomDataExtractor here (patchwire draws per sample from (seed, sample index))."""

IMAGE_PROPERTY_ATTRS = (
    "size",
    "origin",
    "spacing",
    "direction",
    "dimensions",
    "number_of_components_per_pixel",
    "pixel_id",
)


# -- the two libraries -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lib:
    """What a case is built from: ``extr`` and ``tfm`` modules with pymia's names, and a RandomDataExtractor maker
    (patchwire's takes a seed; pymia's draws from numpy's global RNG, seeded per sample by the comparison)."""

    name: str
    extr: Any
    tfm: Any
    index_expression: Callable[..., Any]

    def random(self, selection: Any = None, category: str = "labels") -> Any:
        if self.name == "patchwire":
            return self.extr.RandomDataExtractor(selection, category, seed=SEED)
        return self.extr.RandomDataExtractor(selection, category)


OURS = Lib("patchwire", extr, tfm, IndexExpression)
PYMIA = Lib("pymia", pm.extraction, pm.transformation, pm.data.indexexpression.IndexExpression)

Spec = tuple[Any, Any, Any]  # (indexing strategy, extractor, transform)


# -- comparison --------------------------------------------------------------------------------------------------


def assert_same(ours: Any, theirs: Any, where: str) -> None:
    """``ours`` (patchwire) equals ``theirs`` (pymia): arrays in dtype, shape and every element; ImageProperties
    in every attribute; IndexExpressions in ``.expression``; pickled bytes after unpickling (the bytes themselves
    differ: patchwire's pickle holds ``patchwire.client.conversion.ImageProperties`` /
    ``patchwire.client.indexexpression.IndexExpression``, pymia's holds pymia's classes); everything else in type
    and value, recursively."""
    if isinstance(theirs, np.ndarray):
        assert isinstance(ours, np.ndarray), f"{where}: {type(ours).__name__} instead of an ndarray"
        assert ours.dtype == theirs.dtype, f"{where}: dtype {ours.dtype} != {theirs.dtype}"
        assert ours.shape == theirs.shape, f"{where}: shape {ours.shape} != {theirs.shape}"
        assert np.array_equal(ours, theirs), f"{where}: values differ"
    elif isinstance(theirs, pm.conversion.ImageProperties):
        assert isinstance(ours, ImageProperties), f"{where}: {type(ours).__name__} instead of ImageProperties"
        for attr in IMAGE_PROPERTY_ATTRS:
            assert_same(getattr(ours, attr), getattr(theirs, attr), f"{where}.{attr}")
    elif isinstance(theirs, pm.data.indexexpression.IndexExpression):
        assert isinstance(ours, IndexExpression), f"{where}: {type(ours).__name__} instead of IndexExpression"
        assert_same(ours.expression, theirs.expression, f"{where}.expression")
    elif isinstance(theirs, bytes) and theirs[:1] == b"\x80":  # do_pickle=True
        assert isinstance(ours, bytes), f"{where}: {type(ours).__name__} instead of pickled bytes"
        assert_same(pickle.loads(ours), pickle.loads(theirs), f"{where} (unpickled)")
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
        assert len(ours) == len(theirs), f"{where}: length {len(ours)} != {len(theirs)}: {ours!r} != {theirs!r}"
        for k, (o, t) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(o, t, f"{where}[{k}]")
    elif isinstance(theirs, slice):
        assert type(ours) is slice, f"{where}: {type(ours).__name__} instead of a slice"
        for attr in ("start", "stop", "step"):
            assert_same(getattr(ours, attr), getattr(theirs, attr), f"{where}.{attr}")
    else:
        assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def assert_same_sample(ours: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    assert sorted(ours) == sorted(theirs), f"{where}: keys {sorted(ours)} != {sorted(theirs)}"
    for key in theirs:
        assert_same(ours[key], theirs[key], f"{where}[{key!r}]")


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mclient(server: PatchwireServer) -> Iterator[pw.Client]:
    """One client for the module (Hypothesis tests cannot take function-scoped fixtures)."""
    with pw.connect(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def paths(tiny_h5: Path, vary_h5: Path) -> dict[str, Path]:
    return {"tiny": tiny_h5, "vary": vary_h5}


# -- the cases ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Lib], Spec]
    dataset: str = "tiny"
    subject_subset: Sequence[str] | None = None
    stride: int = 1
    """Compare every ``stride``-th sample (voxel-wise datasources have tens of thousands)."""
    seeded: bool = False
    """A RandomDataExtractor is involved: seed numpy's global RNG per sample as patchwire derives it."""


def _data(lib: Lib, categories: Sequence[str] = ("images", "labels", "mask"), **kw: Any) -> Any:
    return lib.extr.DataExtractor(categories=tuple(categories), **kw)


def _with_index(lib: Lib, *extractors: Any) -> Any:
    return lib.extr.ComposeExtractor([lib.extr.SubjectExtractor(), lib.extr.IndexingExtractor(), *extractors])


def _indexing_case(id: str, strategy: Callable[[Lib], Any], stride: int = 1, dataset: str = "tiny") -> Case:
    return Case(id, lambda lib: (strategy(lib), _with_index(lib, _data(lib)), None), dataset=dataset, stride=stride)


def _slice0(lib: Lib, extractor: Any, transform: Any = None) -> Spec:
    return lib.extr.SliceIndexing(0), extractor, transform


def _transform_case(
    id: str,
    transform: Callable[[Lib], Any],
    indexing: Callable[[Lib], Any] | None = None,
    categories: Sequence[str] = ("images", "labels", "mask"),
) -> Case:
    def build(lib: Lib) -> Spec:
        strategy = lib.extr.SliceIndexing(0) if indexing is None else indexing(lib)
        return strategy, _data(lib, categories), transform(lib)

    return Case(id, build)


def _scale(a: np.ndarray) -> np.ndarray:
    return a * 2 + 1


def _sample_fn(sample: dict[str, Any]) -> dict[str, Any]:
    """A plain callable as a ComposeTransform step (pymia allows any callable; patchwire runs it on the client)."""
    sample["labels"] = sample["labels"].astype(np.int16) - 1
    return sample


INDEXING_CASES = [
    _indexing_case("empty", lambda lib: lib.extr.EmptyIndexing()),
    _indexing_case("slice-0", lambda lib: lib.extr.SliceIndexing(0)),
    _indexing_case("slice-1", lambda lib: lib.extr.SliceIndexing(1)),
    _indexing_case("slice-2", lambda lib: lib.extr.SliceIndexing(2)),
    _indexing_case("slice-2-0", lambda lib: lib.extr.SliceIndexing((2, 0))),
    _indexing_case("patch-8x10x16-ignore", lambda lib: lib.extr.PatchWiseIndexing((8, 10, 16), True)),
    _indexing_case("patch-8x10x16-keep", lambda lib: lib.extr.PatchWiseIndexing((8, 10, 16), False)),
    _indexing_case("patch-7x7x7-ignore", lambda lib: lib.extr.PatchWiseIndexing((7, 7, 7), True)),
    _indexing_case("patch-7x7x7-keep", lambda lib: lib.extr.PatchWiseIndexing((7, 7, 7), False)),
    _indexing_case("patch-2d-6x9-ignore", lambda lib: lib.extr.PatchWiseIndexing((6, 9), True)),
    _indexing_case("patch-2d-6x9-keep", lambda lib: lib.extr.PatchWiseIndexing((6, 9), False)),
    _indexing_case("patch-whole", lambda lib: lib.extr.PatchWiseIndexing((20, 24, 16))),
    _indexing_case("voxel-wise", lambda lib: lib.extr.VoxelWiseIndexing(), stride=97),
    _indexing_case("voxel-wise-2d", lambda lib: lib.extr.VoxelWiseIndexing(2)),
]

EXTRACTOR_CASES = [
    Case(
        "data-ignore-indexing",
        lambda lib: (lib.extr.SliceIndexing(2), _data(lib, ("images",), ignore_indexing=True), None),
    ),
    Case(
        "data-ignore-indexing-mixed",
        lambda lib: (
            lib.extr.PatchWiseIndexing((10, 12, 8)),
            lib.extr.ComposeExtractor([_data(lib, ("labels",)), _data(lib, ("mask",), ignore_indexing=True)]),
            None,
        ),
    ),
    Case("pad-slice0-symmetric", lambda lib: _slice0(lib, lib.extr.PadDataExtractor((1,), _data(lib)))),
    Case("pad-slice0-list", lambda lib: _slice0(lib, lib.extr.PadDataExtractor([(2, 3)], _data(lib, ("images",))))),
    Case(
        "pad-patch-symmetric",
        lambda lib: (
            lib.extr.PatchWiseIndexing((8, 10, 16), False),
            lib.extr.PadDataExtractor((1, 2, 3), _data(lib)),
            None,
        ),
    ),
    Case(
        "pad-patch-list",
        lambda lib: (
            lib.extr.PatchWiseIndexing((7, 7, 7), True),
            lib.extr.PadDataExtractor([(0, 2), (3, 1), (2, 2)], _data(lib, ("images", "labels"))),
            None,
        ),
    ),
    Case(
        "pad-patch-selective",
        lambda lib: (
            lib.extr.PatchWiseIndexing((10, 12, 8)),
            lib.extr.PadDataExtractor((2, 2, 2), lib.extr.SelectiveDataExtractor(("T2",), "images")),
            None,
        ),
    ),
    Case(
        "pad-slice0-random",
        lambda lib: _slice0(lib, lib.extr.PadDataExtractor((1,), lib.random(None, "images"))),
        seeded=True,
    ),
    Case("selective-none-images", lambda lib: _slice0(lib, lib.extr.SelectiveDataExtractor(None, "images"))),
    Case("selective-default", lambda lib: _slice0(lib, lib.extr.SelectiveDataExtractor())),
    Case("selective-reversed", lambda lib: _slice0(lib, lib.extr.SelectiveDataExtractor(("T2", "T1"), "images"))),
    Case(
        "selective-str",
        lambda lib: (
            lib.extr.PatchWiseIndexing((7, 7, 7), False),
            lib.extr.SelectiveDataExtractor("T1", "images"),
            None,
        ),
    ),
    Case(
        "selective-after-names",
        lambda lib: _slice0(
            lib,
            lib.extr.ComposeExtractor([lib.extr.NamesExtractor(), lib.extr.SelectiveDataExtractor(("T2",), "images")]),
        ),
    ),
    Case("random-images", lambda lib: _slice0(lib, lib.random(None, "images")), seeded=True),
    Case(
        "random-selection",
        lambda lib: (lib.extr.SliceIndexing(1), lib.random(("T2", "T1"), "images"), None),
        seeded=True,
    ),
    Case(
        "random-labels-after-names",
        lambda lib: _slice0(
            lib, lib.extr.ComposeExtractor([lib.extr.NamesExtractor(categories=("labels",)), lib.random()])
        ),
        seeded=True,
    ),
    Case("names-default", lambda lib: _slice0(lib, lib.extr.NamesExtractor())),
    Case(
        "names-mask",
        lambda lib: (lib.extr.EmptyIndexing(), lib.extr.NamesExtractor(categories=("images", "mask")), None),
    ),
    Case("subject", lambda lib: _slice0(lib, lib.extr.SubjectExtractor())),
    Case("indexing-empty", lambda lib: (lib.extr.EmptyIndexing(), lib.extr.IndexingExtractor(), None)),
    Case("indexing-slice-2-0", lambda lib: (lib.extr.SliceIndexing((2, 0)), lib.extr.IndexingExtractor(), None)),
    Case(
        "indexing-patch", lambda lib: (lib.extr.PatchWiseIndexing((7, 7, 7), False), lib.extr.IndexingExtractor(), None)
    ),
    Case("indexing-voxel", lambda lib: (lib.extr.VoxelWiseIndexing(), lib.extr.IndexingExtractor(), None), stride=31),
    Case("indexing-pickle-slice", lambda lib: _slice0(lib, lib.extr.IndexingExtractor(do_pickle=True))),
    Case("indexing-pickle-empty", lambda lib: (lib.extr.EmptyIndexing(), lib.extr.IndexingExtractor(True), None)),
    Case(
        "indexing-pickle-patch",
        lambda lib: (lib.extr.PatchWiseIndexing((8, 10, 16), False), lib.extr.IndexingExtractor(True), None),
    ),
    Case("properties", lambda lib: _slice0(lib, lib.extr.ImagePropertiesExtractor())),
    Case("properties-pickle", lambda lib: (lib.extr.EmptyIndexing(), lib.extr.ImagePropertiesExtractor(True), None)),
    Case("shape-numpy", lambda lib: _slice0(lib, lib.extr.ImagePropertyShapeExtractor())),
    Case("shape-itk", lambda lib: (lib.extr.EmptyIndexing(), lib.extr.ImagePropertyShapeExtractor(False), None)),
    Case("files-default", lambda lib: _slice0(lib, lib.extr.FilesExtractor())),
    Case(
        "files-all",
        lambda lib: (lib.extr.EmptyIndexing(), lib.extr.FilesExtractor(categories=("images", "labels", "mask")), None),
    ),
    Case(
        "compose-everything",
        lambda lib: (
            lib.extr.PatchWiseIndexing((10, 12, 16), False),
            lib.extr.ComposeExtractor(
                [
                    lib.extr.NamesExtractor(),
                    lib.extr.SubjectExtractor(),
                    lib.extr.IndexingExtractor(),
                    lib.extr.ImagePropertiesExtractor(),
                    lib.extr.ImagePropertyShapeExtractor(),
                    lib.extr.FilesExtractor(),
                    _data(lib, ("images", "labels")),
                    lib.extr.SelectiveDataExtractor(("MASK",), "mask"),
                ]
            ),
            None,
        ),
    ),
    Case(
        "compose-overwrite",
        lambda lib: _slice0(
            lib,
            lib.extr.ComposeExtractor([_data(lib, ("images",)), lib.extr.SelectiveDataExtractor(("T2",), "images")]),
        ),
    ),
]

TRANSFORM_CASES = [
    _transform_case("permute-images", lambda lib: lib.tfm.Permute((2, 0, 1), entries=("images",))),
    _transform_case("permute-default", lambda lib: lib.tfm.Permute((1, 2, 0))),
    _transform_case("squeeze-labels", lambda lib: lib.tfm.Squeeze(entries=("labels", "mask"))),
    _transform_case("squeeze-axis", lambda lib: lib.tfm.Squeeze(entries=("labels",), squeeze_axis=-1)),
    _transform_case("unsqueeze-default", lambda lib: lib.tfm.UnSqueeze()),
    _transform_case("unsqueeze-0", lambda lib: lib.tfm.UnSqueeze(0, entries=("images", "mask"))),
    _transform_case("reshape", lambda lib: lib.tfm.Reshape({"images": (-1, 2), "labels": (24 * 16,)})),
    _transform_case("normalize", lambda lib: lib.tfm.IntensityNormalization()),
    _transform_case("normalize-loop", lambda lib: lib.tfm.IntensityNormalization(loop_axis=-1)),
    _transform_case(
        "normalize-loop-0",
        lambda lib: lib.tfm.IntensityNormalization(loop_axis=0),
        indexing=lambda lib: lib.extr.PatchWiseIndexing((10, 12, 8)),
    ),
    _transform_case("rescale-float", lambda lib: lib.tfm.IntensityRescale(0.0, 1.0)),
    _transform_case("rescale-int", lambda lib: lib.tfm.IntensityRescale(-1, 1)),
    _transform_case(
        "rescale-int-labels",
        lambda lib: lib.tfm.IntensityRescale(0, 255, entries=("labels",)),
        indexing=lambda lib: lib.extr.PatchWiseIndexing((10, 12, 16)),
    ),
    _transform_case("rescale-loop", lambda lib: lib.tfm.IntensityRescale(-2.5, 7, loop_axis=2)),
    _transform_case("clip", lambda lib: lib.tfm.ClipPercentile(90)),
    _transform_case("clip-lower-loop", lambda lib: lib.tfm.ClipPercentile(95, 10, loop_axis=-1)),
    _transform_case("clip-float-labels", lambda lib: lib.tfm.ClipPercentile(97.5, 2.5, entries=("images", "labels"))),
    _transform_case("relabel", lambda lib: lib.tfm.Relabel({1: 3, 3: 1})),
    _transform_case("relabel-entries", lambda lib: lib.tfm.Relabel({5: 2, 0: 1}, entries=("labels", "mask"))),
    _transform_case("size-correction-crop-pad", lambda lib: lib.tfm.SizeCorrection((21, 19))),
    _transform_case("size-correction-pad-value", lambda lib: lib.tfm.SizeCorrection((27, None, 3), pad_value=7)),
    _transform_case(
        "size-correction-crop3d",
        lambda lib: lib.tfm.SizeCorrection((5, 9, 15), entries=("images",)),
        indexing=lambda lib: lib.extr.EmptyIndexing(),
    ),
    _transform_case("mask-same-shape", lambda lib: lib.tfm.Mask("mask", entries=("labels",))),
    _transform_case("mask-values", lambda lib: lib.tfm.Mask("mask", 1, 7.0, entries=("labels",))),
    _transform_case(
        "mask-loop-axis",
        lambda lib: lib.tfm.ComposeTransform(
            [lib.tfm.Squeeze(entries=("mask",)), lib.tfm.Mask("mask", loop_axis=2, masking_value=4.0)]
        ),
    ),
    _transform_case(
        "mask-loop-axis-neg",
        lambda lib: lib.tfm.ComposeTransform(
            [lib.tfm.Squeeze(entries=("mask",)), lib.tfm.Mask("mask", 1, 9, loop_axis=-1, entries=("images",))]
        ),
    ),
    _transform_case(
        "compose",
        lambda lib: lib.tfm.ComposeTransform(
            [
                lib.tfm.ClipPercentile(99),
                lib.tfm.IntensityNormalization(loop_axis=-1),
                lib.tfm.Relabel({0: 3}),
                lib.tfm.SizeCorrection((22, 18)),
                lib.tfm.Permute((2, 0, 1)),
                lib.tfm.Squeeze(entries=("mask",)),
            ]
        ),
    ),
    _transform_case(
        "compose-nested",
        lambda lib: lib.tfm.ComposeTransform(
            [lib.tfm.ComposeTransform([lib.tfm.UnSqueeze(0)]), lib.tfm.ComposeTransform([lib.tfm.Squeeze()])]
        ),
    ),
    _transform_case(
        "lambda-last",
        lambda lib: lib.tfm.ComposeTransform(
            [lib.tfm.Permute((2, 0, 1), entries=("images",)), lib.tfm.LambdaTransform(_scale)]
        ),
    ),
    _transform_case(
        "lambda-loop",
        lambda lib: lib.tfm.ComposeTransform(
            [
                lib.tfm.IntensityNormalization(),
                lib.tfm.LambdaTransform(np.abs, loop_axis=-1, entries=("images",)),
                _sample_fn,
            ]
        ),
    ),
    _transform_case("lambda-alone", lambda lib: lib.tfm.LambdaTransform(_scale, entries=("labels", "mask"))),
]

DATASET_CASES = [
    Case(
        "subset",
        lambda lib: (lib.extr.SliceIndexing(0), _with_index(lib, _data(lib)), None),
        subject_subset=("Subject_3", "Subject_1"),
    ),
    Case(
        "subset-patch-compose",
        lambda lib: (
            lib.extr.PatchWiseIndexing((7, 7, 7), False),
            _with_index(lib, lib.extr.ImagePropertiesExtractor(), _data(lib, ("images",))),
            lib.tfm.IntensityNormalization(),
        ),
        subject_subset=("Subject_2",),
    ),
    _indexing_case("vary-slice-0", lambda lib: lib.extr.SliceIndexing(0), dataset="vary"),
    _indexing_case("vary-slice-1", lambda lib: lib.extr.SliceIndexing(1), dataset="vary"),
    _indexing_case("vary-slice-2", lambda lib: lib.extr.SliceIndexing(2), dataset="vary"),
    _indexing_case("vary-slice-2-0", lambda lib: lib.extr.SliceIndexing((2, 0)), dataset="vary"),
    _indexing_case("vary-patch-keep", lambda lib: lib.extr.PatchWiseIndexing((8, 10, 16), False), dataset="vary"),
    _indexing_case("vary-patch-ignore", lambda lib: lib.extr.PatchWiseIndexing((7, 7, 7)), dataset="vary"),
    _indexing_case("vary-empty", lambda lib: lib.extr.EmptyIndexing(), dataset="vary"),
    # no IndexingExtractor beside a PadDataExtractor: pymia's rewrites the expression object it also reports
    Case(
        "vary-pad-properties",
        lambda lib: (
            lib.extr.SliceIndexing(0),
            lib.extr.ComposeExtractor(
                [
                    lib.extr.SubjectExtractor(),
                    lib.extr.PadDataExtractor((2,), _data(lib, ("images", "labels"))),
                    lib.extr.ImagePropertiesExtractor(),
                    lib.extr.ImagePropertyShapeExtractor(),
                ]
            ),
            None,
        ),
        dataset="vary",
    ),
    Case(
        "vary-subset",
        lambda lib: (lib.extr.PatchWiseIndexing((11, 24, 16), False), _with_index(lib, _data(lib)), None),
        dataset="vary",
        subject_subset=("Subject_3", "Subject_2"),
    ),
]


def _compare(client: pw.Client, paths: dict[str, Path], case: Case) -> int:
    """Compares the case's samples through the server with pymia's; returns how many were compared."""
    ds = client.datasource(case.dataset, *case.build(OURS), subject_subset=case.subject_subset)
    pymia_ds = pm.extraction.PymiaDatasource(
        str(paths[case.dataset]), *case.build(PYMIA), subject_subset=case.subject_subset
    )
    try:
        assert len(ds) == len(pymia_ds)
        indices = list(range(0, len(pymia_ds), case.stride))
        ours = ds.get_samples(indices)
        assert [s["sample_index"] for s in ours] == indices
        for i, sample in zip(indices, ours, strict=True):
            if case.seeded:
                np.random.seed(derive_seed(SEED, i))
            assert_same_sample(sample, pymia_ds[i], f"{case.id} sample {i}")
        if not case.seeded:  # a negative index counts from the end; pymia reports it as given in sample_index
            assert_same_sample(ds[-1], pymia_ds[-1], f"{case.id} sample -1")
        return len(indices)
    finally:
        pymia_ds.close_reader()
        ds.close()


def _params(cases: list[Case]) -> Any:
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


@_params(INDEXING_CASES)
def test_indexing_parity(mclient: pw.Client, paths: dict[str, Path], case: Case) -> None:
    assert _compare(mclient, paths, case) > 0


@_params(EXTRACTOR_CASES)
def test_extractor_parity(mclient: pw.Client, paths: dict[str, Path], case: Case) -> None:
    assert _compare(mclient, paths, case) > 0


@_params(TRANSFORM_CASES)
def test_transform_parity(mclient: pw.Client, paths: dict[str, Path], case: Case) -> None:
    assert _compare(mclient, paths, case) > 0


@_params(DATASET_CASES)
def test_dataset_parity(mclient: pw.Client, paths: dict[str, Path], case: Case) -> None:
    assert _compare(mclient, paths, case) > 0


def test_subset_keeps_global_subject_indices(mclient: pw.Client) -> None:
    ds = mclient.datasource(
        "tiny", extr.SliceIndexing(0), extr.SubjectExtractor(), subject_subset=["Subject_3", "Subject_1"]
    )
    subjects = [(s["subject_index"], s["subject"]) for s in ds.get_samples(range(len(ds)))]
    assert subjects == [(0, "Subject_1")] * 20 + [(2, "Subject_3")] * 20
    assert [s.subject_index for s in ds.subjects] == [0, 2]


# -- direct extraction and subjects ------------------------------------------------------------------------------


def _direct_extractor(lib: Lib) -> Any:
    return lib.extr.ComposeExtractor(
        [
            _data(lib, ("images", "labels")),
            lib.extr.IndexingExtractor(),
            lib.extr.SubjectExtractor(),
            lib.extr.ImagePropertyShapeExtractor(),
        ]
    )


DIRECT_EXPRESSIONS: list[tuple[str, Callable[[Lib], Any]]] = [
    ("none", lambda lib: None),
    ("whole", lambda lib: lib.index_expression()),
    ("slice", lambda lib: lib.index_expression(3)),
    ("axis-2", lambda lib: lib.index_expression(4, 2)),
    ("ranges", lambda lib: lib.index_expression([(2, 5), (1, 7)])),
    ("mixed", lambda lib: lib.index_expression([3, (2, 9)], (0, 2))),
]
DIRECT_TRANSFORMS: list[tuple[str, Callable[[Lib], Any]]] = [
    ("none", lambda lib: None),
    (
        "unsqueeze-relabel",
        lambda lib: lib.tfm.ComposeTransform([lib.tfm.UnSqueeze(0, entries=("images",)), lib.tfm.Relabel({2: 1})]),
    ),
    (
        "compose-lambda",
        lambda lib: lib.tfm.ComposeTransform([lib.tfm.IntensityNormalization(), lib.tfm.LambdaTransform(_scale)]),
    ),
]


@pytest.mark.parametrize("dataset", ["tiny", "vary"])
@pytest.mark.parametrize(("expr_id", "expr"), DIRECT_EXPRESSIONS, ids=[e[0] for e in DIRECT_EXPRESSIONS])
@pytest.mark.parametrize(("tf_id", "transform"), DIRECT_TRANSFORMS, ids=[t[0] for t in DIRECT_TRANSFORMS])
def test_direct_extract_parity(
    mclient: pw.Client,
    paths: dict[str, Path],
    dataset: str,
    expr_id: str,
    expr: Callable[[Lib], Any],
    tf_id: str,
    transform: Callable[[Lib], Any],
) -> None:
    ds = mclient.datasource(dataset, extr.SliceIndexing(0), extr.DataExtractor())
    pymia_ds = pm.extraction.PymiaDatasource(
        str(paths[dataset]), pm.extraction.SliceIndexing(0), pm.extraction.DataExtractor()
    )
    try:
        for subject in range(3):
            ours = ds.direct_extract(_direct_extractor(OURS), subject, expr(OURS), transform(OURS))
            theirs = pymia_ds.direct_extract(_direct_extractor(PYMIA), subject, expr(PYMIA), transform(PYMIA))
            assert_same_sample(ours, theirs, f"direct_extract({subject}, {expr_id}, {tf_id})")
    finally:
        pymia_ds.close_reader()
        ds.close()


def test_direct_extract_metadata_and_random_parity(mclient: pw.Client, paths: dict[str, Path]) -> None:
    """Metadata-only extractors, and a RandomDataExtractor (outside a datasource it draws from (seed, None))."""

    def extractor(lib: Lib) -> Any:
        return lib.extr.ComposeExtractor(
            [
                lib.extr.ImagePropertiesExtractor(),
                lib.extr.ImagePropertiesExtractor(do_pickle=True),  # overwrites: pickled properties
                lib.extr.FilesExtractor(),
                lib.extr.NamesExtractor(categories=("images", "labels", "mask")),
                lib.extr.ImagePropertyShapeExtractor(numpy_format=False),
                lib.random(("T1", "T2"), "images"),
            ]
        )

    ds = mclient.datasource("vary", extr.EmptyIndexing(), extr.DataExtractor())
    pymia_ds = pm.extraction.PymiaDatasource(
        str(paths["vary"]), pm.extraction.EmptyIndexing(), pm.extraction.DataExtractor()
    )
    try:
        for subject in range(3):
            ours = ds.direct_extract(extractor(OURS), subject, OURS.index_expression(5, 1))
            np.random.seed(derive_seed(SEED, None))
            theirs = pymia_ds.direct_extract(extractor(PYMIA), subject, PYMIA.index_expression(5, 1))
            assert_same_sample(ours, theirs, f"direct_extract({subject})")
    finally:
        pymia_ds.close_reader()
        ds.close()


@pytest.mark.parametrize("dataset", ["tiny", "vary"])
def test_get_subjects_parity(mclient: pw.Client, paths: dict[str, Path], dataset: str) -> None:
    ds = mclient.datasource(dataset, extr.SliceIndexing(0), extr.DataExtractor(), subject_subset=["Subject_2"])
    pymia_ds = pm.extraction.PymiaDatasource(
        str(paths[dataset]), pm.extraction.SliceIndexing(0), pm.extraction.DataExtractor(), subject_subset=["Subject_2"]
    )
    try:
        assert_same(ds.get_subjects(), pymia_ds.get_subjects(), "get_subjects()")
        assert ds.get_subjects() == ["Subject_1", "Subject_2", "Subject_3"]
    finally:
        pymia_ds.close_reader()
        ds.close()


# -- index arithmetic, property-based ----------------------------------------------------------------------------


@st.composite
def _patch_strategies(draw: st.DrawFn) -> tuple[tuple[int, ...], bool]:
    # Axis sizes never exceed the smallest subject's (20, 24, 16): pymia's PatchWiseIndexing fails on an empty grid.
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(3, limit)) for limit in (20, 24, 16)[:ndim])
    return shape, draw(st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patch=_patch_strategies(), dataset=st.sampled_from(["tiny", "vary"]))
def test_patch_expressions_match_pymia(
    mclient: pw.Client, paths: dict[str, Path], patch: tuple[tuple[int, ...], bool], dataset: str
) -> None:
    """Every sample's (subject index, index expression) equals pymia's ``PymiaDatasource.indices``."""
    shape, ignore_incomplete = patch
    ds = mclient.datasource(dataset, extr.PatchWiseIndexing(shape, ignore_incomplete), extr.IndexingExtractor())
    pymia_ds = pm.extraction.PymiaDatasource(
        str(paths[dataset]), pm.extraction.PatchWiseIndexing(shape, ignore_incomplete)
    )
    try:
        assert len(ds) == len(pymia_ds.indices)
        for sample, (subject, expression) in zip(ds.get_samples(range(len(ds))), pymia_ds.indices, strict=True):
            assert_same(sample["subject_index"], subject, "subject_index")
            assert_same(sample["index_expr"], expression, f"index_expr of sample {sample['sample_index']}")
    finally:
        ds.close()


# -- streams: batches() and samples() against ds[i] --------------------------------------------------------------


def _stream_extractor() -> extr.Extractor:
    return extr.ComposeExtractor(
        [
            extr.SubjectExtractor(),
            extr.IndexingExtractor(),
            extr.DataExtractor(categories=("images", "labels")),
            extr.NamesExtractor(),
        ]
    )


STREAM_SPECS: list[tuple[str, Callable[[], Spec]]] = [
    ("slice", lambda: (extr.SliceIndexing(2), _stream_extractor(), tfm.Permute((2, 0, 1), entries=("images",)))),
    ("patch-ragged", lambda: (extr.PatchWiseIndexing((8, 10, 16), False), _stream_extractor(), None)),
    (
        "client-side",
        lambda: (
            extr.SliceIndexing(0),
            extr.ComposeExtractor(
                [extr.DataExtractor(), extr.IndexingExtractor(do_pickle=True), extr.ImagePropertiesExtractor()]
            ),
            tfm.LambdaTransform(_scale),
        ),
    ),
]


def _unbatch(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["sample_index"])
    assert batch["sample_index"].dtype == np.int64
    out = []
    for k in range(n):
        sample: dict[str, Any] = {}
        for key, value in batch.items():
            if key == "sample_index":
                continue
            assert len(value) == n, f"{key}: {len(value)} values in a batch of {n}"
            sample[key] = value[k]
        sample["sample_index"] = int(batch["sample_index"][k])
        out.append(sample)
    return out


def _assert_same_as_items(ds: pw.RemoteDatasource, samples: list[dict[str, Any]]) -> None:
    expected = ds.get_samples([s["sample_index"] for s in samples])
    for got, want in zip(samples, expected, strict=True):
        assert sorted(got) == sorted(want)
        for key in want:
            if isinstance(want[key], IndexExpression | ImageProperties):
                assert got[key] == want[key] and type(got[key]) is type(want[key])
            else:
                assert_same(got[key], want[key], f"sample {want['sample_index']}[{key!r}]")


@pytest.mark.parametrize(("spec_id", "spec"), STREAM_SPECS, ids=[s[0] for s in STREAM_SPECS])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_equal_items(mclient: pw.Client, spec_id: str, spec: Callable[[], Spec], shuffle: bool) -> None:
    ds = mclient.datasource("vary", *spec())
    try:
        batches = list(ds.batches(7, shuffle=shuffle, seed=3, epoch=1))
        assert [len(b["sample_index"]) for b in batches[:-1]] == [7] * (len(batches) - 1)
        for batch in batches:  # arrays equal in shape and dtype across a batch come stacked, others as lists
            for key, value in batch.items():
                if isinstance(value, list):
                    assert len(value) == 1 or not all(
                        isinstance(v, np.ndarray) and v.shape == value[0].shape and v.dtype == value[0].dtype
                        for v in value
                    ), f"{key}: a list of {len(value)} equal-shape arrays, not stacked"
        stacked = {k for b in batches for k, v in b.items() if isinstance(v, np.ndarray) and k != "sample_index"}
        if not shuffle and spec_id != "patch-ragged":  # else hardly a batch of 7 agrees in shape
            assert "images" in stacked
        samples = [s for b in batches for s in _unbatch(b)]
        order = [s["sample_index"] for s in samples]
        assert sorted(order) == list(range(len(ds)))
        assert (order != sorted(order)) == shuffle
        _assert_same_as_items(ds, samples)

        streamed = list(ds.samples(shuffle=shuffle, seed=3, epoch=1))
        assert [s["sample_index"] for s in streamed] == order
        _assert_same_as_items(ds, streamed)
        assert all(type(s["sample_index"]) is int for s in streamed)
    finally:
        ds.close()


def test_shuffle_depends_on_seed_and_epoch_only(mclient: pw.Client) -> None:
    ds = mclient.datasource("tiny", extr.SliceIndexing(0), extr.SubjectExtractor())

    def order(**kw: Any) -> list[int]:
        return [int(i) for b in ds.batches(5, shuffle=True, **kw) for i in b["sample_index"]]

    try:
        first = order(seed=11, epoch=0)
        assert sorted(first) == list(range(len(ds)))
        assert order(seed=11, epoch=0) == first
        assert [s["sample_index"] for s in ds.samples(shuffle=True, seed=11, epoch=0)] == first
        assert order(seed=11, epoch=1) != first
        assert order(seed=12, epoch=0) != first
        assert [int(i) for b in ds.batches(8, shuffle=True, seed=11, epoch=0) for i in b["sample_index"]] == first
    finally:
        ds.close()


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_cover(mclient: pw.Client, drop_last: bool, shuffle: bool) -> None:
    ds = mclient.datasource(
        "vary", extr.SliceIndexing(0), extr.IndexingExtractor(), subject_subset=["Subject_1", "Subject_3"]
    )  # 20 + 24 samples
    batch_size, shard_count = 4, 3
    try:
        n = len(ds)
        assert n % shard_count and (n // shard_count) % batch_size  # neither divides: the edge cases happen
        shards = []
        for shard in range(shard_count):
            sizes, indices = [], []
            for b in ds.batches(
                batch_size,
                shuffle=shuffle,
                seed=5,
                epoch=2,
                shard_index=shard,
                shard_count=shard_count,
                drop_last=drop_last,
            ):
                sizes.append(len(b["sample_index"]))
                indices.extend(int(i) for i in b["sample_index"])
            full_share = len(range(shard, n, shard_count))
            if drop_last:
                assert set(sizes) == {batch_size}
                assert len(indices) == full_share - full_share % batch_size
            else:
                assert sizes[:-1] == [batch_size] * (len(sizes) - 1) and 0 < sizes[-1] <= batch_size
                assert len(indices) == full_share
            shards.append(indices)
        everything = [i for s in shards for i in s]
        assert len(everything) == len(set(everything))  # disjoint
        if drop_last:
            assert set(everything) <= set(range(n))
            assert n - len(everything) < shard_count * batch_size
        else:
            assert sorted(everything) == list(range(n))  # each index exactly once
        # the shards interleave one epoch order: shard k holds positions k, k + 3, ... of it
        epoch = [int(i) for b in ds.batches(batch_size, shuffle=shuffle, seed=5, epoch=2) for i in b["sample_index"]]
        for shard, indices in enumerate(shards):
            assert indices == epoch[shard::shard_count][: len(indices)]
    finally:
        ds.close()


# -- where pymia fails: patchwire's defined behaviour -------------------------------------------------------------


def test_random_data_extractor_negative_index_draws_as_resolved(mclient: pw.Client) -> None:
    ds = mclient.datasource("tiny", extr.SliceIndexing(0), extr.RandomDataExtractor(None, "images", seed=SEED))
    try:
        n = len(ds)
        for i in (-1, -7, -n):
            negative, positive = ds[i], ds[n + i]
            assert negative["sample_index"] == i
            assert negative["images_names_selected"] == positive["images_names_selected"]
            assert_same(negative["images"], positive["images"], f"sample {i}")
    finally:
        ds.close()


def test_assert_same_is_strict() -> None:
    """The comparison itself: dtype, shape, type and expression differences all fail."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    mismatches = [
        (a.astype(np.float64), a),
        (a.reshape(3, 2), a),
        (a + 1, a),
        (a.tolist(), a),
        (1, np.int64(1)),
        (np.int64(1), 1),
        ([1, 2], (1, 2)),
        (["T1"], ["T2"]),
        ((5,), (slice(5, 6),)),
        (1.0, 1),
        (IndexExpression(5), pm.data.indexexpression.IndexExpression((5, 6))),
        (pickle.dumps(IndexExpression(2)), pickle.dumps(pm.data.indexexpression.IndexExpression(3))),
    ]
    for ours, theirs in mismatches:
        with pytest.raises(AssertionError):
            assert_same(ours, theirs, "x")
    assert_same(pickle.dumps(IndexExpression(2, 1)), pickle.dumps(pm.data.indexexpression.IndexExpression(2, 1)), "x")
    with pytest.raises(AssertionError):
        assert_same_sample({"images": a}, {"images": a, "labels": a}, "x")


def _full(path: Path, category: str, subject: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[f"data/{category}/{subject}"][()]


def test_pad_slice_axis_2_is_window_of_padded_array(mclient: pw.Client, tiny_h5: Path) -> None:
    """pymia fails (None in the slice expression); patchwire pads the sliced axis like np.pad would."""
    ds = mclient.datasource(
        "tiny",
        extr.SliceIndexing(2),
        extr.ComposeExtractor(
            [extr.SubjectExtractor(), extr.PadDataExtractor((0, 0, 1), extr.DataExtractor(("images", "labels")))]
        ),
    )
    try:
        samples = ds.get_samples(range(len(ds)))
        for category in ("images", "labels"):
            full = {s: _full(tiny_h5, category, s) for s in range(3)}
            padded = {s: np.pad(a, [(0, 0), (0, 0), (1, 1), (0, 0)]) for s, a in full.items()}
            for sample in samples:
                k = sample["sample_index"] % 16
                expected = padded[sample["subject_index"]][:, :, k : k + 3]
                assert_same(sample[category], expected, f"sample {sample['sample_index']} {category}")
    finally:
        ds.close()


def test_pad_empty_indexing_pads_leading_axes(mclient: pw.Client, tiny_h5: Path) -> None:
    """pymia fails (a bare slice is not iterable); patchwire pads the leading len(padding) axes."""
    ds = mclient.datasource(
        "tiny", extr.EmptyIndexing(), extr.PadDataExtractor([(1, 2), (0, 3)], extr.DataExtractor(("images",)))
    )
    try:
        for s, sample in enumerate(ds.get_samples(range(3))):
            expected = np.pad(_full(tiny_h5, "images", s), [(1, 2), (0, 3), (0, 0), (0, 0)])
            assert_same(sample["images"], expected, f"subject {s}")
    finally:
        ds.close()


def test_pad_does_not_rewrite_index_expressions(mclient: pw.Client) -> None:
    """pymia's PadDataExtractor turns (5,) into (slice(5, 6),) inside the datasource; patchwire leaves it."""
    ds = mclient.datasource(
        "tiny",
        extr.SliceIndexing(0),
        extr.ComposeExtractor([extr.PadDataExtractor((1,), extr.DataExtractor()), extr.IndexingExtractor()]),
    )
    try:
        for _ in range(2):
            sample = ds[5]
            assert sample["index_expr"].expression == (5,)
            assert sample["images"].shape == (3, 24, 16, 2)
    finally:
        ds.close()


def test_permute_default_entries_names_the_missing_entry(mclient: pw.Client, tiny_h5: Path) -> None:
    """Permute's default entries are (images, labels): without labels pymia raises a bare ValueError (so this is
    no parity case); patchwire raises InvalidArgumentError naming the entry and the transform."""
    pymia_ds = pm.extraction.PymiaDatasource(
        str(tiny_h5),
        pm.extraction.SliceIndexing(0),
        pm.extraction.DataExtractor(),
        pm.transformation.Permute((2, 0, 1)),
    )
    try:
        with pytest.raises(ValueError, match='entry "labels" was not extracted'):
            pymia_ds[0]
    finally:
        pymia_ds.close_reader()
    ds = mclient.datasource("tiny", extr.SliceIndexing(0), extr.DataExtractor(), tfm.Permute((2, 0, 1)))
    try:
        with pytest.raises(pw.InvalidArgumentError, match='entry "labels" was not extracted') as info:
            ds[0]
        assert "permute" in str(info.value)
    finally:
        ds.close()


def test_out_of_range_masking_value_is_invalid_argument(mclient: pw.Client, tiny_h5: Path) -> None:
    """-5.0 does not fit uint8 labels: numpy raises OverflowError in pymia; patchwire reports an invalid argument."""
    pymia_ds = pm.extraction.PymiaDatasource(
        str(tiny_h5),
        pm.extraction.SliceIndexing(0),
        pm.extraction.DataExtractor(("labels", "mask")),
        pm.transformation.Mask("mask", 1, -5.0, entries=("labels",)),
    )
    try:
        with pytest.raises(OverflowError):
            pymia_ds[0]
    finally:
        pymia_ds.close_reader()
    ds = mclient.datasource(
        "tiny",
        extr.SliceIndexing(0),
        extr.DataExtractor(("labels", "mask")),
        tfm.Mask("mask", 1, -5.0, entries=("labels",)),
    )
    try:
        with pytest.raises(pw.InvalidArgumentError, match=r"mask \(entries labels\): .*out of bounds for uint8"):
            ds[0]
    finally:
        ds.close()


def test_random_data_extractor_is_order_independent(mclient: pw.Client) -> None:
    """pymia's draws depend on the global RNG state (so on order); patchwire's on (seed, sample index) alone."""
    ds = mclient.datasource("tiny", extr.SliceIndexing(0), extr.RandomDataExtractor(None, "images", seed=SEED))
    try:
        forward = [s["images_names_selected"] for s in ds.get_samples(range(len(ds)))]
        backward = [s["images_names_selected"] for s in ds.get_samples(range(len(ds) - 1, -1, -1))]
        assert forward == backward[::-1]
        assert {name for (name,) in forward} == {"T1", "T2"}
    finally:
        ds.close()
