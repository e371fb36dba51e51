"""Server-side assembly: pymia parity, readiness as completeness, overlap modes, events, status, fetch, export and
precise errors.

pymia 0.3.4's SubjectAssembler is the oracle where patchwire promises its behaviour (non-overlapping indexing,
sequential order); everything else is checked against volumes computed by hand with numpy on the tiny datasets of
``conftest.py``: "tiny" (3 subjects of 20x24x16, images T1/T2 float32) and "vary" (20, 22 and 24 slices).

One module for all of it, and long, because every test runs against the same three server configurations (a state
folder, none, shared memory off), a module-scoped parametrized fixture started once per configuration; the unit tests
of each assembly module are in ``tests/unit/service/assembly``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import SimpleITK as sitk

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service import PatchwireServer
from patchwire.service.assembly.blending import gaussian_weights
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, spec_pb2, tensor_pb2
from patchwire.wire import framing, tensors

from _checks import eventually, expect, expect_raw
from _pymia_oracle import load_pymia
from _servers import serve_process, server_in_thread

T = TypeVar("T")

SHAPE = (20, 24, 16)  # every subject of "tiny"
VARY_SLICES = (20, 22, 24)  # subjects of "vary"
RPC_TIMEOUT_S = 30
IMAGES = extr.DataExtractor(categories=("images",))


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["state-dir", "no-state-dir", "no-shared-memory"])
def server(
    request: pytest.FixtureRequest, tiny_h5: Path, vary_h5: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PatchwireServer]:
    """Every test here runs against a server with a state folder (journalled and synced jobs), one without (jobs in
    memory), and one that lets clients use only the wire (the other two let payloads go through shared memory, as
    this test process is on their host): the assembly they give is the same."""
    state = tmp_path_factory.mktemp("state") if request.param == "state-dir" else None
    shared = request.param != "no-shared-memory"
    with server_in_thread({"tiny": tiny_h5, "vary": vary_h5}, state_dir=state, shared_memory=shared) as srv:
        yield srv


@pytest.fixture(scope="module")
def images(client: pw.Client) -> list[np.ndarray]:
    """The (20, 24, 16, 2) float32 images of every subject of "tiny"."""
    ds = client.datasource("tiny", extr.EmptyIndexing(), IMAGES)
    try:
        return [ds[s]["images"] for s in range(3)]
    finally:
        ds.close()


@pytest.fixture
def open_ds(client: pw.Client) -> Iterator[Callable[..., pw.RemoteDatasource]]:
    """Opens datasources (images only) and closes them after the test."""
    opened: list[pw.RemoteDatasource] = []

    def make(
        indexing: extr.IndexingStrategy, dataset: str = "tiny", subject_subset: list[str] | None = None
    ) -> pw.RemoteDatasource:
        ds = client.datasource(dataset, indexing, IMAGES, subject_subset=subject_subset)
        opened.append(ds)
        return ds

    yield make
    for ds in opened:
        ds.close()


@pytest.fixture
def make_asm(client: pw.Client) -> Iterator[Callable[..., pw.RemoteSubjectAssembler]]:
    """Makes assemblers; their jobs are deleted after the test."""
    made: list[pw.RemoteSubjectAssembler] = []

    def make(ds: pw.RemoteDatasource, **kwargs: Any) -> pw.RemoteSubjectAssembler:
        asm = client.assembler(ds, **kwargs)
        made.append(asm)
        return asm

    yield make
    for asm in made:
        asm.close()
        if asm.job_id is not None:
            with contextlib.suppress(pw.NotFoundError):
                asm.delete()


# -- helpers --------------------------------------------------------------------------------------------------------


def region_shape(expression: Any, shape: Sequence[int] = SHAPE) -> tuple[int, ...]:
    """The shape numpy (and h5py) give ``volume[expression]``: border patches are clamped."""
    return tuple(np.broadcast_to(np.uint8(0), tuple(shape))[expression].shape)


def patch_grid(starts: Sequence[Sequence[int]], patch: Sequence[int]) -> list[tuple[slice, ...]]:
    """The regions of a patch grid in C order (first axis slowest), from hand-computed starts per axis."""
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch, strict=True)) for corner in itertools.product(*starts)]


def slice_prediction(images: list[np.ndarray], i: int) -> np.ndarray:
    """The identity prediction of sample ``i`` of SliceIndexing(0) on "tiny": the sample's own (24, 16, 2) slice."""
    return images[i // SHAPE[0]][i % SHAPE[0]]


def post_slices(asm: pw.RemoteSubjectAssembler, images: list[np.ndarray], indices: Sequence[int], **kw: Any) -> None:
    asm.add_batch(np.stack([slice_prediction(images, i) for i in indices]), np.asarray(indices), **kw)


def subject_states(status: pw.JobStatus) -> list[tuple[str, int, int, bool]]:
    return [(s.state, s.received, s.missing, s.forced) for s in status.subjects]


def raw_batch(
    job_id: str, indices: Sequence[int], fields: Mapping[str, np.ndarray], last_batch: bool = False
) -> list[apb.PostPredictionsRequest]:
    """The requests of one batch of stacked predictions, as the client would send them."""
    batch = apb.PredictionBatch(job_id=job_id, sample_indices=list(indices), last_batch=last_batch)
    payloads = []
    for key, arr in fields.items():
        tensor, payload = tensors.array_to_tensor(np.ascontiguousarray(arr))
        batch.fields.add(key=key, stacked=tensor)
        if payload is not None:
            payloads.append(payload)
    chunks = [
        apb.PostPredictionsRequest(chunk=tensor_pb2.TensorChunk(data=c)) for p in payloads for c in framing.chunks(p)
    ]
    return [apb.PostPredictionsRequest(batch=batch), *chunks]


def post_raw(
    stub: assembly_service_pb2_grpc.AssemblyServiceStub, requests: Sequence[apb.PostPredictionsRequest]
) -> list[apb.PostPredictionsResponse]:
    return list(stub.PostPredictions(iter(requests), timeout=RPC_TIMEOUT_S))


def pymia_properties(h5: Path, subject_index: int) -> Any:
    pymia = load_pymia()
    ds = pymia.extraction.PymiaDatasource(str(h5), pymia.extraction.EmptyIndexing(), pymia.extraction.DataExtractor())
    try:
        props = ds.direct_extract(pymia.extraction.ImagePropertiesExtractor(), subject_index)["properties"]
    finally:
        ds.close_reader()
    return props


def same_geometry(actual: Any, expected: Any, atol: float = 0.0) -> None:
    """Size, origin, spacing and direction of two ImageProperties-like objects (or SimpleITK images) agree."""

    def parts(p: Any) -> list[tuple[float, ...]]:
        if isinstance(p, sitk.Image):
            return [p.GetSize(), p.GetOrigin(), p.GetSpacing(), p.GetDirection()]
        return [p.size, p.origin, p.spacing, p.direction]

    for a, e in zip(parts(actual), parts(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


# == 1. parity with pymia's SubjectAssembler ==========================================================================

PARITY_CASES = {
    "slices-axis0": ("SliceIndexing", (0,), 7, None),
    "slices-axis1": ("SliceIndexing", (1,), 10, None),
    "slices-axis2": ("SliceIndexing", (2,), 5, None),
    "patches-complete": ("PatchWiseIndexing", ((10, 12, 8),), 3, None),
    "patches-incomplete": ("PatchWiseIndexing", ((8, 10, 16), False), 4, None),
    "voxels-one-subject": ("VoxelWiseIndexing", (), 2048, ["Subject_2"]),
}


def _runs(indices: Sequence[int], shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Splits a batch into runs of equal prediction shapes (an array batch must stack)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and shapes[runs[-1][-1]] == shapes[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


@pytest.mark.parametrize("as_dict", [False, True], ids=["array", "dict"])
@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_matches_pymias_subject_assembler(
    client: pw.Client, tiny_h5: Path, make_asm: Callable[..., pw.RemoteSubjectAssembler], case: tuple, as_dict: bool
) -> None:
    # pymia assembles into float64 (its zero_fn is np.zeros); patchwire keeps the predictions' dtype (float32 here),
    # so the volumes are equal once pymia's is cast back to float32 (float32 -> float64 -> float32 is exact).
    pymia = load_pymia()
    strategy, args, batch_size, subset = case
    pm_ds = pymia.extraction.PymiaDatasource(
        str(tiny_h5),
        getattr(pymia.extraction, strategy)(*args),
        pymia.extraction.DataExtractor(categories=("images",)),
        subject_subset=subset,
    )
    pw_ds = client.datasource("tiny", getattr(extr, strategy)(*args), IMAGES, subject_subset=subset)
    try:
        assert len(pw_ds) == len(pm_ds.indices)
        shapes = [region_shape(e.expression) for _, e in pm_ds.indices]
        rng = np.random.default_rng(0)
        predictions = {
            "seg": [rng.standard_normal((*s, 3)).astype(np.float32) for s in shapes],
            "unc": [rng.random((*s, 1)).astype(np.float32) for s in shapes],
        }
        if not as_dict:
            predictions = {"seg": predictions["seg"]}
        pm_asm = pymia.assembler.SubjectAssembler(pm_ds)
        pw_asm = make_asm(pw_ds)
        pm_out: dict[int, Any] = {}
        pw_out: dict[int, Any] = {}
        n = len(shapes)
        for start in range(0, n, batch_size):
            batch = list(range(start, min(start + batch_size, n)))
            last = batch[-1] == n - 1
            runs = _runs(batch, shapes)
            for k, run in enumerate(runs):
                stacked = {key: np.stack([v[i] for i in run]) for key, v in predictions.items()}
                to_assemble = stacked if as_dict else stacked["seg"]
                pm_asm.add_batch(to_assemble, np.asarray(run), last and k == len(runs) - 1)
                if as_dict and len(runs) > 1:
                    continue  # patchwire takes the mixed shapes in one call below
                pw_asm.add_batch(to_assemble, np.asarray(run), last and k == len(runs) - 1)
            if as_dict and len(runs) > 1:
                pw_asm.add_samples({key: [v[i] for i in batch] for key, v in predictions.items()}, batch, last)
            for s in pm_asm.subjects_ready:
                pm_out[s] = pm_asm.get_assembled_subject(s)
            for s in pw_asm.subjects_ready:
                pw_out[s] = pw_asm.get_assembled_subject(s)
        expected_subjects = {1} if subset else {0, 1, 2}
        assert pm_out.keys() == pw_out.keys() == expected_subjects
        for s in expected_subjects:
            pm_vol = pm_out[s] if as_dict else {"seg": pm_out[s]}
            pw_vol = pw_out[s] if as_dict else {"seg": pw_out[s]}
            assert isinstance(pw_out[s], dict) == as_dict
            assert pm_vol.keys() == pw_vol.keys() == predictions.keys()
            for key in predictions:
                assert pm_vol[key].dtype == np.float64
                assert pw_vol[key].dtype == np.float32
                assert pw_vol[key].shape == pm_vol[key].shape == (*SHAPE, predictions[key][0].shape[-1])
                np.testing.assert_array_equal(pw_vol[key], pm_vol[key].astype(np.float32))
    finally:
        pw_ds.close()
        pm_ds.close_reader()


# == 2. readiness is completeness ====================================================================================


def test_shuffled_batches_spanning_subjects_are_ready_when_complete(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    torch = pytest.importorskip("torch")
    asm = make_asm(open_ds(extr.SliceIndexing()))
    order = np.random.default_rng(1).permutation(60)
    posted: set[int] = set()
    assembled: dict[int, np.ndarray] = {}
    for b, start in enumerate(range(0, 60, 7)):
        indices = order[start : start + 7]
        predictions = np.stack([slice_prediction(images, int(i)) for i in indices])
        if b % 2:  # torch tensors are accepted as pymia's are
            asm.add_batch(torch.from_numpy(predictions), torch.from_numpy(indices))
        else:
            asm.add_batch(predictions, indices)
        posted.update(int(i) for i in indices)
        complete = {s for s in range(3) if set(range(20 * s, 20 * s + 20)) <= posted}
        assert asm.subjects_ready | assembled.keys() == complete
        for s in asm.subjects_ready:
            assembled[s] = asm.get_assembled_subject(s)
        assert asm.status().received == len(posted)
    assert assembled.keys() == {0, 1, 2}
    for s in range(3):
        assert assembled[s].dtype == np.float32
        np.testing.assert_array_equal(assembled[s], images[s])


def test_two_clients_post_disjoint_halves_of_one_job(server: PatchwireServer, images: list[np.ndarray]) -> None:
    with pw.connect(server.address) as c1, pw.connect(server.address) as c2:
        ds1 = c1.datasource("tiny", extr.SliceIndexing(), IMAGES)
        ds2 = c2.datasource("tiny", extr.SliceIndexing(), IMAGES)
        a1 = c1.assembler(ds1, entries={"seg": 2})
        a2 = c2.assembler(ds2, job_id=a1.job_id, entries={"seg": 2})  # joins the job: CreateJob is idempotent
        try:
            assert a2.job_id == a1.job_id
            order = np.random.default_rng(2).permutation(60)
            halves = (order[0::2], order[1::2])
            posted: set[int] = set()
            ready: set[int] = set()
            for start in range(0, 30, 5):
                for asm, half in ((a1, halves[0]), (a2, halves[1])):
                    indices = half[start : start + 5]
                    asm.add_batch({"seg": np.stack([slice_prediction(images, int(i)) for i in indices])}, indices)
                    posted.update(int(i) for i in indices)
                    # each assembler hears of the subjects its own batches completed; together they know all
                    ready = a1.subjects_ready | a2.subjects_ready
                    assert ready == {s for s in range(3) if set(range(20 * s, 20 * s + 20)) <= posted}
                    assert a1.status().received == a2.status().received == len(posted)
            assert ready == {0, 1, 2}
            assert a1.status().state == "completed"
            for s in range(3):
                np.testing.assert_array_equal(a2.get_assembled_subject(s)["seg"], images[s])
                np.testing.assert_array_equal(a1.get_assembled_subject(s)["seg"], images[s])
        finally:
            for closable in (a1, a2, ds1, ds2):
                closable.close()
            a1.delete()


def test_duplicates_are_acknowledged_but_never_counted_or_applied_twice(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
    stub: assembly_service_pb2_grpc.AssemblyServiceStub,
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing()))
    post_slices(asm, images, range(5))
    before = asm.status()
    assert before.received == 5
    # re-posted with other values: acknowledged, not counted, and the first predictions stay (even in overwrite mode)
    asm.add_batch(np.zeros((5, 24, 16, 2), np.float32), np.arange(5))
    after = asm.status()
    assert after == before
    # duplicates within one batch count once
    post_slices(asm, images, [5, 5, 6])
    assert asm.status().received == 7
    (response,) = post_raw(
        stub, raw_batch(asm.job_id, [6, 7, 7], {"__prediction": np.zeros((3, 24, 16, 2), np.float32)})
    )
    assert (response.accepted_samples, response.duplicate_samples) == (1, 2)
    assert response.job.received_samples == 8
    post_slices(asm, images, range(8, 20))
    assert asm.subjects_ready == {0}
    volume = asm.get_assembled_subject(0)
    np.testing.assert_array_equal(volume[:7], images[0][:7])
    np.testing.assert_array_equal(volume[7], 0)  # sample 7 arrived first with zeros
    np.testing.assert_array_equal(volume[8:], images[0][8:])


def test_a_subject_is_ready_exactly_when_its_last_index_arrives(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing()))
    rest = [i for i in range(60) if i not in (7, 45)]
    for start in range(0, len(rest), 8):
        post_slices(asm, images, rest[start : start + 8])
    status = asm.status()
    assert subject_states(status) == [
        ("in_progress", 19, 1, False),
        ("ready", 20, 0, False),
        ("in_progress", 19, 1, False),
    ]
    assert [s.missing_sample_indices for s in status.subjects] == [(7,), (), (45,)]
    assert (status.state, status.ready_subject_count, status.last_event_sequence) == ("active", 1, 1)
    assert asm.subjects_ready == {1}
    post_slices(asm, images, [45])
    assert asm.subjects_ready == {1, 2}
    assert subject_states(asm.status())[2] == ("ready", 20, 0, False)
    assert asm.status().state == "active"
    post_slices(asm, images, [7])
    status = asm.status()
    assert asm.subjects_ready == {0, 1, 2}
    assert subject_states(status)[0] == ("ready", 20, 0, False)
    assert (status.state, status.received, status.ready_subject_count) == ("completed", 60, 3)
    assert [(e.type, e.subject_index) for e in asm.events()] == [
        ("subject_ready", 1),
        ("subject_ready", 2),
        ("subject_ready", 0),
        ("job_completed", -1),
    ]
    for s in range(3):
        np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])


def test_last_batch_finishes_subjects_in_progress_and_leaves_pending_ones(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    # PatchWiseIndexing((10, 12, 8)): 8 complete patches per subject, C order over a 2x2x2 grid
    asm = make_asm(open_ds(extr.PatchWiseIndexing((10, 12, 8))))
    regions = patch_grid([(0, 10), (0, 12), (0, 8)], (10, 12, 8))

    def patch(i: int) -> np.ndarray:
        return np.full((1, 10, 12, 8, 1), i + 1, np.float32)

    for i in (0, 1, 2, 17):
        asm.add_batch(patch(i), [i])
    assert subject_states(asm.status()) == [
        ("in_progress", 3, 5, False),
        ("pending", 0, 8, False),
        ("in_progress", 1, 7, False),
    ]
    asm.add_batch(patch(18), [18], last_batch=True)
    status = asm.status()
    assert subject_states(status) == [
        ("ready", 3, 5, True),
        ("pending", 0, 8, False),
        ("ready", 2, 6, True),
    ]
    assert status.subjects[0].missing_sample_indices == (3, 4, 5, 6, 7)
    assert status.subjects[2].missing_sample_indices == (16, 19, 20, 21, 22, 23)
    assert (status.state, status.received, status.ready_subject_count) == ("active", 5, 2)
    assert asm.subjects_ready == {0, 2}
    expected = np.zeros((*SHAPE, 1), np.float32)
    for i in (0, 1, 2):
        expected[regions[i]] = i + 1
    np.testing.assert_array_equal(asm.get_assembled_subject(0), expected)
    # a finished subject takes no more samples; the pending one still assembles normally
    with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "was already finished before sample 3"):
        asm.add_batch(patch(3), [3])
    assert asm.status() == status
    asm.add_batch(np.concatenate([patch(i) for i in range(8, 16)]), np.arange(8, 16))
    status = asm.status()
    assert subject_states(status)[1] == ("ready", 8, 0, False)
    assert (status.state, status.received, status.ready_subject_count) == ("completed", 13, 3)
    # a completed job acknowledges re-posted samples but takes no new ones
    asm.add_batch(patch(0), [0])
    with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "is completed", "got sample 4"):
        asm.add_batch(patch(4), [4])
    assert asm.status() == status


def test_pymia_infers_readiness_from_arrival_order_patchwire_does_not(
    tiny_h5: Path,
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    pymia = load_pymia()
    pm_ds = pymia.extraction.PymiaDatasource(str(tiny_h5), pymia.extraction.SliceIndexing(), pymia_images())
    try:
        pm_asm = pymia.assembler.SubjectAssembler(pm_ds)
        asm = make_asm(open_ds(extr.SliceIndexing()))
        for i in (0, 20):  # one slice of subject 0, then one of subject 1 (a shuffled loader does this)
            batch = np.stack([slice_prediction(images, i)])
            pm_asm.add_batch(batch, np.asarray([i]))
            asm.add_batch(batch, np.asarray([i]))
        assert pm_asm.subjects_ready == {0}  # pymia: "ready" with 1 of 20 slices
        assert np.count_nonzero(pm_asm.get_assembled_subject(0)[1:]) == 0
        assert asm.subjects_ready == set()
        assert subject_states(asm.status())[:2] == [("in_progress", 1, 19, False), ("in_progress", 1, 19, False)]
        with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "1 of 20 samples received"):
            asm.get_assembled_subject(0)
    finally:
        pm_ds.close_reader()


def pymia_images() -> Any:
    return load_pymia().extraction.DataExtractor(categories=("images",))


# == 3. overlap modes ================================================================================================

# PatchWiseIndexing((8, 10, 16), stride=(6, 8, 16)) on 20x24x16, by hand: axis 0 starts 0, 6, 12 (12 + 8 = 20);
# axis 1 starts 0, 8 and the border patch at 24 - 10 = 14 (16 + 10 > 24); axis 2 one patch. 9 patches per subject.
STRIDED = {"patch_shape": (8, 10, 16), "stride": (6, 8, 16)}
STRIDED_REGIONS = patch_grid([(0, 6, 12), (0, 8, 14), (0,)], (8, 10, 16))


def _constant_patches(n: int, dtype: Any, value: Callable[[int], int]) -> list[np.ndarray]:
    return [np.full((8, 10, 16, 1), value(i), dtype) for i in range(n)]


def _post_in_order(
    asm: pw.RemoteSubjectAssembler, patches: list[np.ndarray], order: Sequence[int] | np.ndarray, size: int
) -> None:
    for start in range(0, len(order), size):
        batch = [int(i) for i in order[start : start + size]]
        asm.add_batch(np.stack([patches[i] for i in batch]), batch)


@pytest.mark.parametrize("mode", ["average", "gaussian"])
def test_constant_patches_blend_to_the_hand_computed_mean(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler], mode: str
) -> None:
    ds = open_ds(extr.PatchWiseIndexing(**STRIDED))
    assert len(ds) == 3 * len(STRIDED_REGIONS)
    asm = make_asm(ds, overlap=mode)
    patches = _constant_patches(len(ds), np.float32, lambda i: i + 1)  # patch i predicts i + 1 everywhere
    _post_in_order(asm, patches, np.random.default_rng(3).permutation(len(ds)), 4)
    assert asm.subjects_ready == {0, 1, 2}
    weight = np.ones((8, 10, 16)) if mode == "average" else gaussian_weights((8, 10, 16)).astype(np.float64)
    for s in range(3):
        num = np.zeros(SHAPE)
        den = np.zeros(SHAPE)
        for k, region in enumerate(STRIDED_REGIONS):
            num[region] += weight * (9 * s + k + 1)
            den[region] += weight
        expected = (num / den)[..., None]
        volume = asm.get_assembled_subject(s)
        assert volume.dtype == np.float32
        if mode == "average":
            # small integer sums and counts are exact in float32 and division is correctly rounded: bit for bit
            np.testing.assert_array_equal(volume, expected.astype(np.float32))
        else:
            np.testing.assert_allclose(volume, expected, rtol=1e-6)
            assert not np.allclose(volume, _plain_mean(s), rtol=1e-3)  # the weights matter


def _plain_mean(s: int) -> np.ndarray:
    num = np.zeros(SHAPE)
    den = np.zeros(SHAPE)
    for k, region in enumerate(STRIDED_REGIONS):
        num[region] += 9 * s + k + 1
        den[region] += 1
    return (num / den)[..., None]


def test_overwrite_is_last_write_wins_in_arrival_order(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    ds = open_ds(extr.PatchWiseIndexing(**STRIDED))
    asm = make_asm(ds, overlap="overwrite")
    patches = _constant_patches(len(ds), np.float32, lambda i: i + 1)
    order = np.random.default_rng(4).permutation(len(ds))
    _post_in_order(asm, patches, order, 4)
    expected = [np.zeros((*SHAPE, 1), np.float32) for _ in range(3)]
    for i in order:  # within a batch, samples apply in batch order
        expected[i // 9][STRIDED_REGIONS[i % 9]] = i + 1
    for s in range(3):
        np.testing.assert_array_equal(asm.get_assembled_subject(s), expected[s])
    assert not np.array_equal(expected[0], _plain_mean(0).astype(np.float32))


def test_integer_average_is_rounded_half_to_even(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    ds = open_ds(extr.PatchWiseIndexing(**STRIDED))
    asm = make_asm(ds, overlap="average")
    patches = _constant_patches(len(ds), np.uint8, lambda i: (7 * i) % 11)
    _post_in_order(asm, patches, range(len(ds)), 5)
    for s in range(3):
        num = np.zeros(SHAPE)
        den = np.zeros(SHAPE)
        for k, region in enumerate(STRIDED_REGIONS):
            num[region] += (7 * (9 * s + k)) % 11
            den[region] += 1
        mean = num / den
        half = mean % 1 == 0.5
        assert np.any(half & (mean // 1 % 2 == 0)) and np.any(half & (mean // 1 % 2 == 1))  # both ways to round
        volume = asm.get_assembled_subject(s)
        assert volume.dtype == np.uint8
        np.testing.assert_array_equal(volume, np.rint(mean).astype(np.uint8)[..., None])  # 2.5 -> 2, 3.5 -> 4


IDENTITY_CASES = {
    # every voxel covered at most twice (axis 0 only; 12..20 is the border patch): x + x is exact in float32, so the
    # average is exactly x (with three or more patches the running sum 3x rounds and the mean can be 1 ulp off)
    "stride-two-fold": (extr.PatchWiseIndexing((8, 12, 16), stride=(8, 12, 16)), ("average", "gaussian")),
    # a dense sliding window: up to 8 patches per voxel
    "stride-dense": (extr.PatchWiseIndexing((8, 10, 16), stride=(4, 5, 8)), ("gaussian",)),
    # pymia's grid with clamped (smaller) border patches, no overlap
    "pymia-incomplete": (extr.PatchWiseIndexing((8, 10, 16), ignore_incomplete=False), ("average", "gaussian")),
}


@pytest.mark.parametrize(
    ("indexing", "mode"),
    [(case[0], mode) for case in IDENTITY_CASES.values() for mode in case[1]],
    ids=[f"{name}-{mode}" for name, case in IDENTITY_CASES.items() for mode in case[1]],
)
def test_identity_predictions_reproduce_the_image(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
    indexing: extr.PatchWiseIndexing,
    mode: str,
) -> None:
    """Sliding-window inference end to end: stream shuffled batches, predict the input, post it back."""
    ds = open_ds(indexing)
    asm = make_asm(ds, overlap=mode)
    for batch in ds.batches(batch_size=6, shuffle=True, seed=5):
        if isinstance(batch["images"], np.ndarray):
            asm.add_batch({"images": batch["images"]}, batch["sample_index"])
        else:  # border patches of other shapes in the batch
            asm.add_samples({"images": batch["images"]}, batch["sample_index"])
    assert asm.subjects_ready == {0, 1, 2}
    for s in range(3):
        volume = asm.get_assembled_subject(s)["images"]
        assert volume.dtype == np.float32
        if mode == "average":
            np.testing.assert_array_equal(volume, images[s])
        else:
            np.testing.assert_allclose(volume, images[s], rtol=1e-5)


def test_gaussian_blending_of_single_voxels(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    """A voxel-wise sample is a 0-d region: its weight is 1 (the centre of a one-voxel Gaussian)."""
    ds = open_ds(extr.VoxelWiseIndexing(), subject_subset=["Subject_3"])
    asm = make_asm(ds, overlap="gaussian")
    values = np.random.default_rng(6).random((len(ds), 2)).astype(np.float32)
    for start in range(0, len(ds), 4096):
        asm.add_batch(values[start : start + 4096], np.arange(start, min(start + 4096, len(ds))))
    assert asm.subjects_ready == {2}
    np.testing.assert_array_equal(asm.get_assembled_subject(2), values.reshape(*SHAPE, 2))


def test_subjects_without_samples_do_not_hold_up_the_job(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    """Patches of 22 slices fit in Subject_2 and Subject_3 of "vary" (22 and 24 slices) only; Subject_1 (20 slices)
    has no sample, so it is not part of the job (pymia's assembler never sees it either)."""
    ds = open_ds(extr.PatchWiseIndexing((22, 24, 16)), dataset="vary")
    assert [s.sample_count for s in ds.subjects] == [0, 1, 1]
    asm = make_asm(ds)
    for i in range(len(ds)):
        asm.add_batch(np.ones((1, 22, 24, 16, 1), np.float32), [i])
    status = asm.status()
    assert (status.state, status.expected, status.received) == ("completed", 2, 2)
    assert [(s.subject_index, s.state) for s in status.subjects] == [(1, "ready"), (2, "ready")]
    assert [e.type for e in asm.events()] == ["subject_ready", "subject_ready", "job_completed"]


# == 4. events =======================================================================================================


def test_events_replay_the_past_then_follow_live_until_the_job_completes(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing()))
    post_slices(asm, images, range(40))  # subjects 0 and 1 ready before anyone listens
    events = asm.events()
    first, second = next(events), next(events)
    assert [(e.sequence, e.type, e.subject_index, e.subject) for e in (first, second)] == [
        (1, "subject_ready", 0, "Subject_1"),
        (2, "subject_ready", 1, "Subject_2"),
    ]
    assert first.time_unix_ms <= second.time_unix_ms
    post_slices(asm, images, range(40, 60))  # the subscriber is waiting: these arrive live
    assert [(e.sequence, e.type, e.subject_index) for e in events] == [
        (3, "subject_ready", 2),
        (4, "job_completed", -1),
    ]  # ... and the iterator ends after job_completed
    assert [e.sequence for e in asm.events(from_sequence=3)] == [3, 4]
    assert [e.sequence for e in asm.events(from_sequence=0)] == [1, 2, 3, 4]
    assert list(asm.events(from_sequence=5)) == []
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "from_sequence: must not be negative"):
        next(asm.events(from_sequence=-1))


def test_events_of_an_aborted_job_end_with_job_aborted(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing()))
    post_slices(asm, images, range(25))
    events = asm.events()
    assert next(events).type == "subject_ready"
    asm.abort()  # while the subscriber waits
    assert [(e.sequence, e.type, e.subject_index) for e in events] == [(2, "job_aborted", -1)]
    assert [e.type for e in asm.events()] == ["subject_ready", "job_aborted"]


def test_events_end_when_the_job_is_deleted(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing()))
    post_slices(asm, images, range(20))
    events = asm.events()
    assert next(events).subject_index == 0
    asm.delete()
    assert list(events) == []


@pytest.mark.parametrize("end", ["abort", "complete"])
def test_a_subscriber_arriving_as_the_job_ends_still_gets_the_final_event(
    server: PatchwireServer,
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    end: str,
) -> None:
    """White box: the job is held after its state changed but before its final event is written; a subscription
    that starts then must wait for that event, not end without it."""
    asm = make_asm(open_ds(extr.SliceIndexing()))
    post_slices(asm, images, range(40))
    job = server.assembly.jobs[asm.job_id]
    held, release = concurrent.futures.Future[None](), concurrent.futures.Future[None]()
    save_metadata = job.save_metadata

    def hold() -> None:
        save_metadata()
        if job.state != apb.JOB_STATE_ACTIVE:
            held.set_result(None)
            release.result(timeout=RPC_TIMEOUT_S)

    monkeypatch.setattr(job, "save_metadata", hold)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ending = pool.submit(asm.abort) if end == "abort" else pool.submit(post_slices, asm, images, range(40, 60))
        held.result(timeout=RPC_TIMEOUT_S)
        events = asm.events()
        seen = [next(events), next(events)]
        if end == "complete":
            seen.append(next(events))  # subject 2's event precedes the state change
        release.set_result(None)
        ending.result(timeout=RPC_TIMEOUT_S)
        seen.extend(events)
    final = "job_aborted" if end == "abort" else "job_completed"
    assert [e.type for e in seen][-2:] == ["subject_ready", final]


# == 5. status, fetch, export, abort, delete =========================================================================


def test_status_through_a_job(
    server: PatchwireServer,
    client: pw.Client,
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
) -> None:
    ds = open_ds(extr.SliceIndexing(), dataset="vary")  # subjects of 20, 22 and 24 slices: samples 0, 20, 42
    asm = make_asm(ds, dtype=np.uint8, entries={"label": 1})
    status = asm.status()
    assert (status.dataset, status.state, status.overlap) == ("vary", "active", "overwrite")
    assert status.journalled == (server.config.state_dir is not None)
    assert (status.expected, status.received, status.subject_count, status.ready_subject_count) == (66, 0, 3, 0)
    assert (status.last_event_sequence, status.resident_buffer_bytes) == (0, 0)
    assert [(s.subject_index, s.subject, s.expected, s.received, s.missing, s.state) for s in status.subjects] == [
        (0, "Subject_1", 20, 0, 20, "pending"),
        (1, "Subject_2", 22, 0, 22, "pending"),
        (2, "Subject_3", 24, 0, 24, "pending"),
    ]
    assert [s.missing_sample_indices for s in status.subjects] == [
        tuple(range(16)),
        tuple(range(20, 36)),
        tuple(range(42, 58)),
    ]  # the first 16 by default
    assert [s.missing_sample_indices for s in asm.status(max_missing=3).subjects][1] == (20, 21, 22)
    assert all(s.missing_sample_indices == () for s in asm.status(max_missing=0).subjects)

    def post(indices: Sequence[int]) -> None:
        asm.add_batch({"label": np.ones((len(indices), 24, 16, 1), np.uint8)}, list(indices))

    post(range(0, 40))
    status = asm.status(max_missing=4)
    assert (status.received, status.ready_subject_count, status.last_event_sequence) == (40, 1, 1)
    assert subject_states(status) == [("ready", 20, 0, False), ("in_progress", 20, 2, False), ("pending", 0, 24, False)]
    assert [s.missing_sample_indices for s in status.subjects] == [(), (40, 41), (42, 43, 44, 45)]
    # the second subject's uint8 volume is in memory; the first's is freed once written to its result (in the
    # background), or, without a state folder, kept in memory as the finished volume
    kept = server.config.state_dir is None
    first = 20 * 24 * 16 if kept else 0
    status = eventually(lambda: asm.status(max_missing=4), lambda s: s.resident_buffer_bytes == first + 22 * 24 * 16)
    assert client.job_status(asm.job_id, max_missing=4) == status
    assert asm.job_id in {j.job_id for j in client.jobs()}
    post(range(40, 66))
    status = asm.status()
    assert (status.state, status.received, status.ready_subject_count) == ("completed", 66, 3)
    assert status.last_event_sequence == 4
    eventually(asm.status, lambda s: s.resident_buffer_bytes == (sum(VARY_SLICES) * 24 * 16 if kept else 0))
    assert subject_states(status) == [("ready", n, 0, False) for n in VARY_SLICES]


@pytest.fixture(scope="module")
def vary_job(client: pw.Client) -> Iterator[tuple[pw.RemoteSubjectAssembler, list[dict[str, np.ndarray]]]]:
    """A completed job on "vary" (slices) with entries prob (3 channels float32) and label (1 channel uint8)."""
    ds = client.datasource("vary", extr.SliceIndexing(), IMAGES)
    asm = client.assembler(ds)
    rng = np.random.default_rng(8)
    expected: list[dict[str, np.ndarray]] = [
        {
            "prob": rng.random((n, 24, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 4, (n, 24, 16, 1)).astype(np.uint8),
        }
        for n in VARY_SLICES
    ]
    first = 0
    for volume in expected:
        asm.add_batch(volume, np.arange(first, first + len(volume["prob"])))
        first += len(volume["prob"])
    assert asm.subjects_ready == {0, 1, 2}
    yield asm, expected
    asm.close()
    asm.delete()
    ds.close()


@pytest.mark.parametrize("subject_index", [0, 2])
def test_fetch_returns_the_volumes_and_the_datasets_geometry(
    vary_job: tuple[pw.RemoteSubjectAssembler, list[dict[str, np.ndarray]]], vary_h5: Path, subject_index: int
) -> None:
    asm, expected = vary_job
    arrays, properties = asm.fetch(subject_index)
    assert arrays.keys() == {"prob", "label"}
    for key, arr in arrays.items():
        assert arr.dtype == expected[subject_index][key].dtype
        np.testing.assert_array_equal(arr, expected[subject_index][key])
    reference = pymia_properties(vary_h5, subject_index)
    assert properties.size == (16, 24, VARY_SLICES[subject_index])
    same_geometry(properties, reference)
    assert properties.dimensions == 3


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
@pytest.mark.parametrize("entry", ["label", "prob"])
def test_export_images_keep_the_array_and_the_original_geometry(
    vary_job: tuple[pw.RemoteSubjectAssembler, list[dict[str, np.ndarray]]],
    vary_h5: Path,
    tmp_path: Path,
    suffix: str,
    entry: str,
) -> None:
    asm, expected = vary_job
    path = asm.export(1, tmp_path / f"out{suffix}", entry=entry)
    assert path == tmp_path / f"out{suffix}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left behind
    image = sitk.ReadImage(str(path))
    want = expected[1][entry]
    if want.shape[-1] == 1:  # a single channel is a scalar image
        assert image.GetNumberOfComponentsPerPixel() == 1
        want = want[..., 0]
    else:
        assert image.GetNumberOfComponentsPerPixel() == 3
    array = sitk.GetArrayFromImage(image)
    assert array.dtype == want.dtype
    np.testing.assert_array_equal(array, want)
    # NIfTI stores the geometry in float32
    same_geometry(image, pymia_properties(vary_h5, 1), atol=1e-5 if suffix == ".nii.gz" else 1e-12)


def test_export_of_a_multi_entry_job_needs_a_known_entry(
    vary_job: tuple[pw.RemoteSubjectAssembler, list[dict[str, np.ndarray]]], tmp_path: Path
) -> None:
    asm, _ = vary_job
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "entry: the job has several entries"):
        asm.export(0, tmp_path / "out.mha")
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, "has no entry 'nope' (entries: prob, label)"):
        asm.export(0, tmp_path / "out.mha", entry="nope")
    with pytest.raises(ValueError, match="cannot tell the format"):
        asm.export(0, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_hdf5_export_is_a_pymia_dataset(
    vary_job: tuple[pw.RemoteSubjectAssembler, list[dict[str, np.ndarray]]], vary_h5: Path, tmp_path: Path
) -> None:
    asm, expected = vary_job
    path = asm.export(2, tmp_path / "subject.h5")
    pymia = load_pymia()
    ds = pymia.extraction.PymiaDatasource(
        str(path),
        pymia.extraction.EmptyIndexing(),
        pymia.extraction.ComposeExtractor(
            [
                pymia.extraction.DataExtractor(categories=("images", "label")),
                pymia.extraction.ImagePropertiesExtractor(),
                pymia.extraction.NamesExtractor(categories=("images", "label")),
            ]
        ),
    )
    try:
        assert ds.get_subjects() == ["Subject_3"]
        assert len(ds) == 1
        sample = ds[0]
    finally:
        ds.close_reader()
    np.testing.assert_array_equal(sample["images"], expected[2]["prob"])  # the first entry is category 'images'
    np.testing.assert_array_equal(sample["label"], expected[2]["label"])
    assert sample["images"].dtype == np.float32 and sample["label"].dtype == np.uint8
    assert list(sample["images_names"]) == ["prob_0", "prob_1", "prob_2"]
    assert list(sample["label_names"]) == ["label_0"]
    same_geometry(sample["properties"], pymia_properties(vary_h5, 2))


def test_abort_frees_unfinished_subjects_and_rejects_further_posts(
    server: PatchwireServer,
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing()))
    post_slices(asm, images, range(25))
    # subject 1's partial float32 volume; subject 0's is unmapped once written, in the background (without a state
    # folder it stays in memory: it is the finished volume)
    subject_bytes = 20 * 24 * 16 * 2 * 4
    kept = subject_bytes if server.config.state_dir is None else 0
    eventually(asm.status, lambda s: s.resident_buffer_bytes == kept + subject_bytes)
    status = asm.abort()
    assert (status.state, status.received, status.ready_subject_count, status.resident_buffer_bytes) == (
        "aborted",
        25,
        1,
        kept,
    )
    assert subject_states(asm.status()) == [
        ("ready", 20, 0, False),
        ("aborted", 5, 15, False),
        ("aborted", 0, 20, False),
    ]
    with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "was aborted"):
        post_slices(asm, images, range(25, 30))
    with expect(
        pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "is not active (state JOB_STATE_ABORTED)"
    ):
        asm.abort()
    with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "5 of 20 samples received"):
        asm.fetch(1)
    assert asm.status().received == 25
    np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])  # finished subjects stay fetchable


def test_delete_removes_the_job(
    client: pw.Client,
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> None:
    ds = open_ds(extr.SliceIndexing())
    asm = make_asm(ds)
    post_slices(asm, images, range(20))
    job_id = asm.job_id
    asm.delete()
    assert asm.subjects_ready == set()
    assert job_id not in {j.job_id for j in client.jobs()}
    unknown = f"unknown assembly job {job_id!r}"
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, f"job_id: {unknown}"):
        asm.status()
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, f"batch.job_id: {unknown}"):
        post_slices(asm, images, range(20, 22))
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, unknown):
        asm.fetch(0)
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, unknown):
        next(asm.events())
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, unknown):
        asm.delete()
    # an assembler given the id of the deleted job finds nothing until it posts (which creates the job anew)
    again = make_asm(ds, job_id=job_id)
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, unknown):
        again.status()
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, unknown):
        client.job_status(job_id)


# == 6. bad input ====================================================================================================


@pytest.fixture
def job(
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
    images: list[np.ndarray],
) -> Iterator[pw.RemoteSubjectAssembler]:
    """A job on slices of "tiny" with one entry 'seg' (2 channels float32) that holds samples 0..3. After the test
    the server still takes a valid batch and has lost nothing it acknowledged."""
    asm = make_asm(open_ds(extr.SliceIndexing()), entries={"seg": 2})
    asm.add_batch({"seg": np.stack([slice_prediction(images, i) for i in range(4)])}, np.arange(4))
    yield asm
    status = asm.status()
    if status.state == "active":
        asm.add_batch({"seg": np.stack([slice_prediction(images, 4)])}, [4])
        assert asm.status().received == status.received + 1


def assert_unchanged(asm: pw.RemoteSubjectAssembler, received: int = 4) -> None:
    status = asm.status()
    assert (status.state, status.received) == ("active", received)


def seg(*shape: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    return {"seg": np.zeros(shape, dtype)}


def test_wrong_prediction_shape(job: pw.RemoteSubjectAssembler) -> None:
    with expect(
        pw.InvalidArgumentError,
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch.fields['seg']: prediction for sample 4 has shape (23, 16, 2), expected (24, 16, 2)",
    ):
        job.add_batch(seg(2, 23, 16, 2), [4, 5])
    assert_unchanged(job)
    # one bad sample rejects the whole batch: the good one before it is not taken either
    with expect(
        pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "prediction for sample 5 has shape (24, 16)"
    ):
        job.add_samples({"seg": [np.zeros((24, 16, 2), np.float32), np.zeros((24, 16), np.float32)]}, [4, 5])
    assert_unchanged(job)


def test_wrong_channel_count(job: pw.RemoteSubjectAssembler) -> None:
    with expect(
        pw.InvalidArgumentError,
        grpc.StatusCode.INVALID_ARGUMENT,
        "has shape (24, 16, 3), expected (24, 16, 2) (the sample's region of subject 0 plus 2 channel(s)",
    ):
        job.add_batch(seg(1, 24, 16, 3), [4])
    assert_unchanged(job)


def test_non_numeric_predictions(job: pw.RemoteSubjectAssembler, stub: Any) -> None:
    with pytest.raises(TypeError, match="cannot travel as a patchwire tensor"):  # refused before anything is sent
        job.add_batch({"seg": np.full((1, 24, 16, 2), "x")}, [4])
    requests = raw_batch(job.job_id, [4], seg(1, 24, 16, 2))
    requests[0].batch.fields[0].stacked.dtype = tensor_pb2.DATA_TYPE_UNSPECIFIED
    with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "batch.fields: unknown or unspecified tensor dtype 0"):
        post_raw(stub, requests)
    assert_unchanged(job)


@pytest.mark.parametrize("indices", [[60], [-1], [4, 60]])
def test_sample_index_out_of_range(job: pw.RemoteSubjectAssembler, indices: list[int]) -> None:
    bad = indices.index(indices[-1])
    with expect(
        pw.OutOfRangeError,
        grpc.StatusCode.OUT_OF_RANGE,
        f"batch.sample_indices[{bad}]: sample index {indices[-1]} is out of range for job {job.job_id!r} with 60",
    ):
        job.add_batch(seg(len(indices), 24, 16, 2), indices)
    assert_unchanged(job)


def test_unknown_subject_and_subject_not_ready(job: pw.RemoteSubjectAssembler, tmp_path: Path) -> None:
    for subject in (3, -1):
        with expect(
            pw.NotFoundError, grpc.StatusCode.NOT_FOUND, f"subject_index: subject {subject} is not part of job"
        ):
            job.fetch(subject)
    with expect(
        pw.InvalidArgumentError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "subject 0 ('Subject_1')",
        "is not ready: 4 of 20 samples received (SUBJECT_STATE_IN_PROGRESS)",
    ):
        job.get_assembled_subject(0)
    with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, "0 of 20 samples received"):
        job.export(1, tmp_path / "out.mha")
    assert list(tmp_path.iterdir()) == []
    assert_unchanged(job)


def test_subject_outside_the_subset_is_not_in_the_job(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    asm = make_asm(open_ds(extr.SliceIndexing(), subject_subset=["Subject_2"]), entries={"seg": 1})
    assert [s.subject_index for s in asm.status().subjects] == [1]
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, "subject 0 is not part of job", "(subjects: 1)"):
        asm.fetch(0)


def test_bad_job_ids(
    open_ds: Callable[..., pw.RemoteDatasource], make_asm: Callable[..., pw.RemoteSubjectAssembler]
) -> None:
    ds = open_ds(extr.SliceIndexing())
    for job_id in ("has space", "a/b", "x" * 129, "..", ".", ".hidden", "-flag"):
        with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "job_id: ", "may use only"):
            make_asm(ds, job_id=job_id, entries={"seg": 1})


def test_existing_job_id_with_other_parameters(
    job: pw.RemoteSubjectAssembler,
    open_ds: Callable[..., pw.RemoteDatasource],
    make_asm: Callable[..., pw.RemoteSubjectAssembler],
) -> None:
    slices = open_ds(extr.SliceIndexing())
    for ds, kwargs in (
        (slices, {"entries": {"seg": 3}}),
        (slices, {"entries": {"other": 2}}),
        (slices, {"entries": {"seg": 2}, "dtype": np.float64}),
        (slices, {"entries": {"seg": 2}, "overlap": "average"}),
        (open_ds(extr.SliceIndexing(1)), {"entries": {"seg": 2}}),
        (open_ds(extr.SliceIndexing(), subject_subset=["Subject_1"]), {"entries": {"seg": 2}}),
    ):
        with expect(
            pw.InvalidArgumentError,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"job_id: job {job.job_id!r} already exists with other parameters",
        ):
            make_asm(ds, job_id=job.job_id, **kwargs)
    # the same parameters join the job (another extractor does not matter: only indexing and subset do)
    joined = make_asm(slices, job_id=job.job_id, entries={"seg": 2})
    assert joined.status().received == 4
    assert_unchanged(job)


def test_batch_entries_must_be_the_jobs(job: pw.RemoteSubjectAssembler) -> None:
    with expect(
        pw.InvalidArgumentError,
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch.fields: expected exactly the entries ['seg'], got ['other']",
    ):
        job.add_batch({"other": np.zeros((1, 24, 16, 2), np.float32)}, [4])
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "got ['extra', 'seg']"):
        job.add_batch({**seg(1, 24, 16, 2), "extra": np.zeros((1, 24, 16, 1), np.float32)}, [4])
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "got ['__prediction']"):
        job.add_batch(np.zeros((1, 24, 16, 2), np.float32), [4])
    assert_unchanged(job)


def test_client_side_batch_checks(job: pw.RemoteSubjectAssembler) -> None:
    with pytest.raises(ValueError, match=r"expected shape \(batch, \.\.\., channels\) with batch 2"):
        job.add_batch(seg(3, 24, 16, 2), [4, 5])
    with pytest.raises(ValueError, match="with batch 1"):
        job.add_batch({"seg": np.zeros(2, np.float32)}, [4])
    assert_unchanged(job)


def test_posting_to_an_aborted_job(job: pw.RemoteSubjectAssembler) -> None:
    job.abort()
    for indices in ([0], [4]):  # duplicates and new samples alike
        with expect(pw.InvalidArgumentError, grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id!r} was aborted"):
            job.add_batch(seg(1, 24, 16, 2), indices)
    assert job.status().received == 4


def test_status_and_export_parameters(job: pw.RemoteSubjectAssembler, stub: Any) -> None:
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "max_missing: must not be negative"):
        job.status(max_missing=-1)
    with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "format: choose EXPORT_FORMAT_NIFTI"):
        list(stub.ExportSubject(apb.ExportSubjectRequest(job_id=job.job_id, subject_index=0), timeout=RPC_TIMEOUT_S))
    with expect_raw(grpc.StatusCode.NOT_FOUND, "job_id: unknown assembly job 'nope'"):
        stub.AbortJob(apb.AbortJobRequest(job_id="nope"), timeout=RPC_TIMEOUT_S)
    assert_unchanged(job)


def _entry(name: str = "seg", channels: int = 2, dtype: int = tensor_pb2.DATA_TYPE_FLOAT32) -> apb.OutputEntry:
    return apb.OutputEntry(name=name, channels=channels, dtype=dtype)


_SPEC = spec_pb2.DatasourceSpec(dataset="tiny")
BAD_CREATE = {
    "no-spec": (apb.CreateJobRequest(entries=[_entry()], overlap_mode=apb.OVERLAP_MODE_OVERWRITE), "spec: the"),
    "no-mode": (apb.CreateJobRequest(spec=_SPEC, entries=[_entry()]), "overlap_mode: choose"),
    "no-entries": (apb.CreateJobRequest(spec=_SPEC, overlap_mode=apb.OVERLAP_MODE_AVERAGE), "entries: give at least"),
    "empty-name": (
        apb.CreateJobRequest(spec=_SPEC, entries=[_entry("")], overlap_mode=apb.OVERLAP_MODE_AVERAGE),
        "entries[0].name: '' may use only letters, digits",  # empty: not 1 to 64 characters
    ),
    "no-channels": (
        apb.CreateJobRequest(spec=_SPEC, entries=[_entry(channels=0)], overlap_mode=apb.OVERLAP_MODE_AVERAGE),
        "entries[0].channels: must be positive, got 0",
    ),
    "no-dtype": (
        apb.CreateJobRequest(spec=_SPEC, entries=[_entry(dtype=0)], overlap_mode=apb.OVERLAP_MODE_AVERAGE),
        "entries[0].dtype: unknown or unspecified dtype 0",
    ),
    "same-names": (
        apb.CreateJobRequest(spec=_SPEC, entries=[_entry(), _entry()], overlap_mode=apb.OVERLAP_MODE_AVERAGE),
        "entries: entry names must be unique",
    ),
}


@pytest.mark.parametrize(("request_", "fragment"), BAD_CREATE.values(), ids=BAD_CREATE.keys())
def test_create_job_checks_its_request(stub: Any, request_: apb.CreateJobRequest, fragment: str) -> None:
    with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, fragment):
        stub.CreateJob(request_, timeout=RPC_TIMEOUT_S)


def test_create_job_on_an_unknown_dataset(stub: Any) -> None:
    request = apb.CreateJobRequest(
        spec=spec_pb2.DatasourceSpec(dataset="nope"), entries=[_entry()], overlap_mode=apb.OVERLAP_MODE_OVERWRITE
    )
    with expect_raw(grpc.StatusCode.NOT_FOUND, "unknown dataset 'nope'"):
        stub.CreateJob(request, timeout=RPC_TIMEOUT_S)


def _announced(job_id: str, nbytes: int = 24 * 16 * 2 * 4) -> apb.PostPredictionsRequest:
    """A batch for sample 4 whose tensor is announced as chunked (its payload must follow in chunks)."""
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 24, 16, 2], chunked_nbytes=nbytes)
    batch = apb.PredictionBatch(job_id=job_id, sample_indices=[4])
    batch.fields.add(key="seg", stacked=tensor)
    return apb.PostPredictionsRequest(batch=batch)


def _chunk(nbytes: int) -> apb.PostPredictionsRequest:
    return apb.PostPredictionsRequest(chunk=tensor_pb2.TensorChunk(data=bytes(nbytes)))


MALFORMED: dict[str, tuple[Callable[[str], list[apb.PostPredictionsRequest]], str]] = {
    "chunk-first": (lambda j: [_chunk(8), *raw_batch(j, [4], seg(1, 24, 16, 2))], "chunk: a tensor chunk arrived"),
    "no-payload": (lambda j: [apb.PostPredictionsRequest()], "payload: neither batch nor chunk is set"),
    "ends-mid-batch": (lambda j: [_announced(j), _chunk(1000)], "the stream ended in the middle of a batch"),
    "chunk-overrun": (lambda j: [_announced(j), _chunk(3000), _chunk(1000)], "chunk: tensor chunk overruns"),
    "batch-before-chunks": (
        lambda j: [_announced(j), *raw_batch(j, [5], seg(1, 24, 16, 2))],
        "batch: a new batch arrived before the previous batch's tensor chunks",
    ),
    "chunk-after-batch": (
        lambda j: [*raw_batch(j, [0], seg(1, 24, 16, 2)), _chunk(8)],  # the batch itself is a duplicate
        "chunk: a tensor chunk arrived before any batch",
    ),
    "payload-size": (  # refused when announced, before any chunk
        lambda j: [_announced(j, 100), _chunk(100)],
        "batch.fields: tensor of shape (1, 24, 16, 2) and dtype float32 needs 3072 bytes, but announces 100",
    ),
    "count-mismatch": (
        lambda j: raw_batch(j, [4, 5, 6], seg(2, 24, 16, 2)),
        "batch.fields['seg']: 2 predictions for 3 sample indices",
    ),
}


@pytest.mark.parametrize(("requests", "fragment"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_prediction_streams(
    job: pw.RemoteSubjectAssembler,
    stub: Any,
    requests: Callable[[str], list[apb.PostPredictionsRequest]],
    fragment: str,
) -> None:
    with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, fragment):
        post_raw(stub, requests(job.job_id))
    assert_unchanged(job)


def test_unknown_job_in_a_raw_batch(stub: Any, job: pw.RemoteSubjectAssembler) -> None:
    with expect_raw(grpc.StatusCode.NOT_FOUND, "batch.job_id: unknown assembly job 'nope'"):
        post_raw(stub, raw_batch("nope", [4], seg(1, 24, 16, 2)))
    assert_unchanged(job)


# -- pipelined posting (window > 1) ---------------------------------------------------------------------------------


def test_window_pipelines_posts_and_assembles_the_same(open_ds, make_asm, images) -> None:
    ds = open_ds(extr.SliceIndexing(0))
    asm = make_asm(ds, window=4)
    order = [int(i) for i in np.random.default_rng(5).permutation(len(ds))]
    batches = [order[k : k + 7] for k in range(0, len(order), 7)]
    for k, batch in enumerate(batches):
        post_slices(asm, images, batch, last_batch=k == len(batches) - 1)
        assert asm.unacknowledged_batches <= 3  # at most window - 1 batches wait for their acknowledgement
    assert not asm.unacknowledged_batches and asm.subjects_ready == {0, 1, 2}  # a last batch waits for every ack
    for s in range(3):
        assert np.array_equal(asm.get_assembled_subject(s), images[s])
    assert asm.status().state == "completed"


def test_window_reports_a_rejected_batch_and_keeps_the_later_ones(open_ds, make_asm, images) -> None:
    ds = open_ds(extr.SliceIndexing(0))
    asm = make_asm(ds, window=8)
    post_slices(asm, images, [0, 1])
    asm.add_batch(np.zeros((2, 5, 5, 2), np.float32), np.asarray([2, 3]))  # wrong shape: rejected by the server
    post_slices(asm, images, [4, 5])
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "sample 2", "expected (24, 16, 2)"):
        asm.flush()
    asm.flush()  # the batch after the rejected one was sent again and acknowledged
    status = asm.status()
    assert status.received == 4
    assert [i for i in range(6) if i not in status.subjects[0].missing_sample_indices] == [0, 1, 4, 5]


def test_window_must_be_positive(open_ds, client) -> None:
    with pytest.raises(ValueError, match="window"):
        client.assembler(open_ds(extr.SliceIndexing(0)), window=0)


def test_a_fork_while_a_post_stream_is_open_neither_waits_nor_loses_a_batch(tiny_h5: Path) -> None:
    """A post stream's request thread waits inside gRPC for the next batch; a DataLoader that forks its workers
    between two batches then made gRPC wait a minute and fork without its fork handlers. The stream is closed before
    the fork (its batches acknowledged first) and the next batch opens a new one."""
    with serve_process({"tiny": tiny_h5}) as (_, address), pw.connect(address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=("images",)))
        images = np.stack([ds[i]["images"][..., :1] for i in range(len(ds))]).astype(np.float32)
        with client.assembler(ds, entries={"seg": 1}, window=2, shared_memory=False) as asm:
            asm.add_batch({"seg": images[:30]}, np.arange(30))  # in flight: window 2
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            forked_s = time.monotonic() - started
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            assert forked_s < 5, f"the fork took {forked_s:.1f} s"
            asm.add_batch({"seg": images[30:]}, np.arange(30, len(ds)), last_batch=True)
            volumes = [asm.fetch(s)[0]["seg"] for s in range(3)]
            np.testing.assert_array_equal(np.concatenate(volumes), images)
            asm.delete()
        ds.close()
