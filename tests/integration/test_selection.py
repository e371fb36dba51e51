"""select_indices through a real server: the same indices as pymia 0.3.4's ``select_indices`` on the same file
where pymia's strategies work, the documented meaning where they fail or mislead (NonConstantSelection's loop_axis,
PercentileSelection), subject criteria answered without reading samples, selections over several messages, bad
specs refused with INVALID_ARGUMENT, and a cancelled scan that stops."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.client import selection as sel
from patchwire.client import transformation as tfm
from patchwire.service import PatchwireServer, _selection
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, spec_pb2
from patchwire.wire import framing

from _checks import eventually, expect, expect_raw
from _datasets import make_pymia_dataset, write_arrays_dataset
from _pymia_oracle import load_pymia
from _servers import server_in_thread

pm = load_pymia()
BIG = 32 * 48 * 48
"""Samples of the "big" dataset voxel-wise (one subject of 32x48x48): more than one message of indices holds."""


def _made_subject() -> dict[str, dict[str, np.ndarray]]:
    """Six 4x5 slices (axis 0) of two channels, one case each (see test_non_constant_and_percentile_meanings)."""
    t1 = np.zeros((6, 4, 5), np.float32)
    t2 = np.zeros((6, 4, 5), np.float32)
    rng = np.random.default_rng(11)
    t1[0], t2[0] = 1, 2  # each channel constant, the two different
    t1[1], t2[1] = 3, 3  # constant
    t1[2], t2[2] = np.arange(20).reshape(4, 5), 7  # one channel varies
    t1[3], t2[3] = rng.normal(5, 1, (4, 5)), rng.normal(5, 1, (4, 5))  # noise
    # slice 4 is all zeros; slice 5 has 30 zeros of 40 values
    t1[5, :2] = rng.uniform(1, 2, (2, 5))
    labels = np.zeros((6, 4, 5), np.uint8)
    return {"images": {"T1": t1, "T2": t2}, "labels": {"GT": labels}}


@pytest.fixture(scope="module")
def files(tiny_h5: Path, vary_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = write_arrays_dataset(tmp_path_factory.mktemp("made") / "made.h5", [_made_subject()])
    big = make_pymia_dataset(tmp_path_factory.mktemp("big"), subjects=1, shape=(32, 48, 48))
    return {"tiny": tiny_h5, "vary": vary_h5, "made": made, "big": big}


@pytest.fixture(scope="module")
def server(files: dict[str, Path]) -> Iterator[PatchwireServer]:
    """One reading thread: a request served after a cancelled scan runs only once the scan's step has returned."""
    with server_in_thread(files, read_threads=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: PatchwireServer) -> Iterator[dataset_service_pb2_grpc.DatasetServiceStub]:
    with grpc.insecure_channel(server.address, options=framing.channel_options()) as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)


# -- pymia's answers ------------------------------------------------------------------------------------------------

OURS = types.SimpleNamespace(e=extr, t=tfm, s=sel)
PYMIA = types.SimpleNamespace(e=pm.extraction, t=pm.transformation, s=pm.extraction)
Case = Callable[[Any], tuple[Any, Any, Any, Any]]
"""A library (its extraction ``e``, transformation ``t`` and selection ``s`` modules: pymia keeps its selection
strategies in ``extraction``) -> (indexing, extractor, transform, strategy)."""


def _slices(axis: int, strategy: str, *args: Any) -> Case:
    """Slices along ``axis``, images only, no transform, and the strategy named ``strategy`` made with ``args``."""
    return lambda lib: (lib.e.SliceIndexing(axis), lib.e.DataExtractor(), None, getattr(lib.s, strategy)(*args))


def _with_labels(indexing: Callable[[Any], Any], transform: Callable[[Any], Any] | None, strategy: Case) -> Case:
    """Images and labels extracted, an optional transform, and the strategy ``strategy(lib)``."""
    return lambda lib: (
        indexing(lib.e),
        lib.e.DataExtractor(categories=("images", "labels")),
        None if transform is None else transform(lib.t),
        strategy(lib),
    )


def _no_label_3(t: Any) -> Any:
    """Without the scattered label 3, the slices at either end of axis 0 have no foreground."""
    return t.Relabel({0: 3})


CASES: dict[str, tuple[str, Case]] = {
    "non-black": ("tiny", _slices(0, "NonBlackSelection", 190)),
    "non-black-axis-2": ("tiny", _slices(2, "NonBlackSelection", 205.5)),
    "foreground": (
        "tiny",
        _with_labels(lambda e: e.SliceIndexing(0), _no_label_3, lambda lib: lib.s.WithForegroundSelection()),
    ),
    "foreground-patches": (
        "tiny",
        _with_labels(lambda e: e.PatchWiseIndexing((4, 4, 4)), None, lambda lib: lib.s.WithForegroundSelection()),
    ),
    "subject": ("tiny", _slices(0, "SubjectSelection", "Subject_2")),
    "subjects-by-index": ("vary", _slices(1, "SubjectSelection", [2, 0])),
    "compose": (
        "tiny",
        _with_labels(
            lambda e: e.SliceIndexing(0),
            _no_label_3,
            lambda lib: lib.s.ComposeSelection(
                [
                    lib.s.SubjectSelection(["Subject_1", "Subject_3"]),
                    lib.s.NonBlackSelection(180),
                    lib.s.WithForegroundSelection(),
                ]
            ),
        ),
    ),
    "non-constant": ("made", _slices(0, "NonConstantSelection")),
    "percentile": ("made", _slices(0, "PercentileSelection", 50)),
}


def _pymia_indices(path: Path, case: Case, subject_subset: list[str] | None = None) -> list[int]:
    indexing, extractor, transform, strategy = case(PYMIA)
    # pymia's SubjectSelection reads the subject from the sample: it needs a SubjectExtractor
    extractor = pm.extraction.ComposeExtractor([extractor, pm.extraction.SubjectExtractor()])
    source = pm.extraction.PymiaDatasource(str(path), indexing, extractor, transform, subject_subset)
    try:
        return list(pm.extraction.select_indices(source, strategy))
    finally:
        source.close_reader()


def _ours(client: pw.Client, dataset: str, case: Case, subject_subset: list[str] | None = None) -> list[int]:
    indexing, extractor, transform, strategy = case(OURS)
    return sel.select_indices(client.datasource(dataset, indexing, extractor, transform, subject_subset), strategy)


@pytest.mark.parametrize("name", sorted(CASES))
def test_select_indices_equals_pymias(name: str, client: pw.Client, files: dict[str, Path]) -> None:
    dataset, case = CASES[name]
    ours = _ours(client, dataset, case)
    theirs = _pymia_indices(files[dataset], case)
    assert ours == theirs
    total = len(client.datasource(dataset, case(OURS)[0], extr.DataExtractor()))
    assert 0 < len(ours) < total, f"{name}: a case that selects {len(ours)} of {total} samples tells little"


def test_subject_subset_keeps_global_subject_indices(client: pw.Client, files: dict[str, Path]) -> None:
    _, case = CASES["subjects-by-index"]
    ours = _ours(client, "vary", case, ["Subject_1", "Subject_2"])
    assert ours == _pymia_indices(files["vary"], case, ["Subject_1", "Subject_2"]) == list(range(24))


def test_subjects_need_no_extractor_and_read_nothing(client: pw.Client, server: PatchwireServer) -> None:
    servicer = server.servicer
    assert servicer is not None
    before = servicer.samples_built
    ds = client.datasource("vary", extr.SliceIndexing(0))  # no extractor: samples could not even be read
    assert sel.select_indices(ds, sel.SubjectSelection(["Subject_3", "elsewhere", 1])) == list(range(20, 66))
    assert sel.select_indices(ds, sel.SubjectSelection("nobody")) == []
    assert servicer.samples_built == before


# -- the documented meaning where pymia fails or misleads -----------------------------------------------------------


def test_non_constant_and_percentile_meanings(client: pw.Client, files: dict[str, Path]) -> None:
    """The six slices of "made": constant channels of different values (0), constant (1), one varying channel (2),
    noise (3), zeros (4), 30 zeros of 40 values (5)."""
    ds = client.datasource("made", extr.SliceIndexing(0), extr.DataExtractor())
    assert sel.select_indices(ds, sel.NonConstantSelection()) == [0, 2, 3, 5]
    assert sel.select_indices(ds, sel.NonConstantSelection(loop_axis=-1)) == [2, 3, 5]  # any channel not constant
    assert sel.select_indices(ds, sel.NonConstantSelection(loop_axis=2)) == [2, 3, 5]
    assert sel.select_indices(ds, sel.NonConstantSelection(loop_axis=0)) == [0, 2, 3, 5]  # rows hold both channels
    with pytest.raises(IndexError):  # pymia's loop_axis
        _pymia_indices(files["made"], _slices(0, "NonConstantSelection", 0))
    # at least ceil(39 p / 100) + 1 of the 40 values at the minimum: 21 for p=50, 33 for p=80
    assert sel.select_indices(ds, sel.PercentileSelection(50)) == [1, 4, 5]
    assert sel.select_indices(ds, sel.PercentileSelection(80)) == [1, 4]
    assert sel.select_indices(ds, sel.PercentileSelection(0)) == list(range(6))
    assert _pymia_indices(files["made"], _slices(0, "PercentileSelection", 80)) == [1, 4]


@pytest.mark.parametrize(
    ("dataset", "strategy"),
    [
        ("made", sel.ComposeSelection([sel.NonBlackSelection(0.5), sel.NonConstantSelection(loop_axis=-1)])),
        ("made", sel.PercentileSelection(50)),
        ("tiny", sel.ComposeSelection([sel.NonBlackSelection(190), sel.SubjectSelection([0, "Subject_3"])])),
    ],
    ids=["non-constant", "percentile", "subjects"],
)
def test_client_side_evaluation_agrees_with_the_server(client: pw.Client, dataset: str, strategy: Any) -> None:
    """A strategy of the user's own, or a transform with a client-side callable, is evaluated on the client, with
    the same meanings (a SubjectSelection there reads a SubjectExtractor's entries, as in pymia)."""
    extractor = extr.ComposeExtractor([extr.DataExtractor(), extr.SubjectExtractor()])
    ds = client.datasource(dataset, extr.SliceIndexing(0), extractor)
    on_server = sel.select_indices(ds, strategy)
    assert 0 < len(on_server) < len(ds)
    lambda_ds = client.datasource(dataset, extr.SliceIndexing(0), extractor, tfm.LambdaTransform(lambda s: s))
    assert sel.select_indices(lambda_ds, strategy) == on_server
    custom = sel.ComposeSelection([strategy, lambda sample: True])
    assert sel.select_indices(ds, custom) == on_server


def test_random_transforms_draw_as_get_samples_does(client: pw.Client) -> None:
    """Each sample is evaluated with the randomness of its index under (seed, epoch), as GetSamples (and an unshuffled
    stream, where the client evaluates) makes it."""
    from patchwire.client import augmentation

    shift = augmentation.RandomIntensityScaleShift(scale=0.0, shift=30.0)
    ds = client.datasource("tiny", extr.SliceIndexing(0), extr.DataExtractor(), shift)
    answers = {}
    for seed, epoch in ((3, 0), (3, 1), (4, 0)):
        expected = [
            s["sample_index"]
            for s in ds.get_samples(range(len(ds)), seed=seed, epoch=epoch)
            if (s["images"] > 190).any()
        ]
        answers[seed, epoch] = sel.select_indices(ds, sel.NonBlackSelection(190), seed=seed, epoch=epoch)
        assert answers[seed, epoch] == expected
    assert len(set(map(tuple, answers.values()))) == 3  # the draws differ
    lambda_ds = client.datasource(
        "tiny",
        extr.SliceIndexing(0),
        extr.DataExtractor(),
        tfm.ComposeTransform([shift, tfm.LambdaTransform(lambda a: a)]),
    )
    assert sel.select_indices(lambda_ds, sel.NonBlackSelection(190), seed=3, epoch=1) == answers[3, 1]


# -- messages, errors, cancellation ---------------------------------------------------------------------------------


def _request(dataset: str, indexing: Any, selection: spec_pb2.Selection, extractor: Any = None) -> Any:
    spec = spec_pb2.DatasourceSpec(dataset=dataset, indexing_strategy=indexing._to_proto())
    if extractor is not None:
        spec.extractor.CopyFrom(extractor._to_proto())
    return dataset_service_pb2.SelectIndicesRequest(spec=spec, selection=selection)


def test_a_large_selection_spans_several_messages(client: pw.Client, stub: Any) -> None:
    request = _request("big", extr.VoxelWiseIndexing(), sel.SubjectSelection(0)._to_proto())
    messages = [list(m.indices) for m in stub.SelectIndices(request, timeout=60)]
    assert [len(m) for m in messages] == [65536, BIG - 65536]
    assert [i for m in messages for i in m] == list(range(BIG))
    assert sel.select_indices(client.datasource("big", extr.VoxelWiseIndexing()), sel.SubjectSelection(0)) == list(
        range(BIG)
    )


def test_samples_read_for_a_selection_span_messages(
    stub: Any, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_selection, "MAX_INDICES_PER_MESSAGE", 7)
    request = _request("tiny", extr.SliceIndexing(0), sel.NonBlackSelection(190)._to_proto(), extr.DataExtractor())
    messages = [list(m.indices) for m in stub.SelectIndices(request, timeout=60)]
    assert len(messages) > 1 and all(len(m) == 7 for m in messages[:-1]) and 0 < len(messages[-1]) <= 7
    assert [i for m in messages for i in m] == _pymia_indices(files["tiny"], CASES["non-black"][1])


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (
            lambda: (extr.DataExtractor(), sel.WithForegroundSelection()),
            ["selection.with_foreground: sample 0 has no entry 'labels'"],
        ),
        (
            lambda: (extr.DataExtractor(), sel.NonConstantSelection(loop_axis=4)),
            ["selection.non_constant.loop_axis: axis 4 is out of bounds for the 3-D entry 'images'"],
        ),
        (
            lambda: (extr.DataExtractor(), sel.ComposeSelection([sel.SubjectSelection(-1)])),
            ["selection.compose.strategies[0].subject.subject_indices", "-1"],
        ),
        (
            lambda: (extr.SubjectExtractor(), sel.NonBlackSelection()),
            ["selection.non_black: sample 0 has no entry 'images'", "subject_index"],
        ),
        (lambda: (None, sel.NonBlackSelection()), ["spec.extractor: selection.non_black tests each sample's"]),
    ],
    ids=["no-labels", "loop-axis", "negative-subject", "no-images", "no-extractor"],
)
def test_bad_selections_are_invalid_arguments(client: pw.Client, make: Any, fragments: list[str]) -> None:
    extractor, strategy = make()
    ds = client.datasource("tiny", extr.SliceIndexing(0), extractor)
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, *fragments):
        sel.select_indices(ds, strategy)
    assert sel.select_indices(ds, sel.SubjectSelection(1)) == list(range(20, 40))  # the server keeps serving


@pytest.mark.parametrize(
    ("selection", "fragment"),
    [
        (spec_pb2.Selection(), "selection: no strategy is set"),
        (
            spec_pb2.Selection(percentile=spec_pb2.PercentileSelection(percentile=101)),
            "selection.percentile.percentile: must lie in [0, 100], got 101",
        ),
    ],
    ids=["empty", "percentile"],
)
def test_malformed_selections_are_invalid_arguments(stub: Any, selection: spec_pb2.Selection, fragment: str) -> None:
    request = _request("tiny", extr.SliceIndexing(0), selection, extr.DataExtractor())
    with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, fragment):
        list(stub.SelectIndices(request, timeout=60))


def test_a_cancelled_scan_stops_within_a_sample(server: PatchwireServer, stub: Any) -> None:
    """A voxel-wise scan that selects nothing: the client cancels once the server has started reading samples; the
    server stops long before it has read them all, and nothing runs on afterwards."""
    servicer = server.servicer
    assert servicer is not None
    before = servicer.samples_built
    request = _request("big", extr.VoxelWiseIndexing(), sel.NonBlackSelection(1e9)._to_proto(), extr.DataExtractor())
    call = stub.SelectIndices(request, timeout=60)
    eventually(lambda: servicer.samples_built, lambda n: n > before)
    call.cancel()
    eventually(lambda: server.calls.total, lambda n: n == 0)
    slices = _request("big", extr.SliceIndexing(0), sel.NonBlackSelection()._to_proto(), extr.DataExtractor())
    assert [list(m.indices) for m in stub.SelectIndices(slices, timeout=60)] == [list(range(32))]  # queued behind
    stopped_at = servicer.samples_built - 32 - before
    assert stopped_at < BIG // 2, f"{stopped_at} of {BIG} samples read for a client that had gone"
    assert [list(m.indices) for m in stub.SelectIndices(slices, timeout=60)] == [list(range(32))]
    assert servicer.samples_built == before + stopped_at + 64  # nothing else runs in the background
