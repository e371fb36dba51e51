"""Random patches from a real server: every sampled patch is the window of the zero-padded volume (read here with
h5py) that its index expression names, on pymia's tiny datasets and a small phantom; an epoch streams
``subjects x samples_per_volume`` patches, the same (seed, epoch) gives the same bytes whatever the path (stream or
GetSamples, shuffled or not), another epoch gives other patches; a label sampler centres patches on its label; an
assembly job on a sampled datasource is refused."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import h5py
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service import PatchwireServer
from patchwire.service._phantom import make_phantom_dataset
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2, tensor_pb2
from patchwire.wire import definition as defs

from _checks import expect, expect_raw
from _servers import server_in_thread

PHANTOM_SHAPE = (40, 48, 36)
RPC_TIMEOUT_S = 30
EXTRACTOR = extr.ComposeExtractor(
    [extr.DataExtractor(("images", "labels")), extr.IndexingExtractor(), extr.SubjectExtractor()]
)


@pytest.fixture(scope="module")
def phantom_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("phantom") / "phantom.h5"
    make_phantom_dataset(path, subjects=2, shape=PHANTOM_SHAPE, seed=3)
    return path


@pytest.fixture(scope="module")
def paths(tiny_h5: Path, vary_h5: Path, phantom_h5: Path) -> dict[str, Path]:
    return {"tiny": tiny_h5, "vary": vary_h5, "phantom": phantom_h5}


@pytest.fixture(scope="module")
def server(paths: dict[str, Path]) -> Iterator[PatchwireServer]:
    with server_in_thread(paths) as srv:
        yield srv


def _volumes(path: Path, category: str) -> list[np.ndarray]:
    """Every subject's array of ``category``, read with h5py alone."""
    with h5py.File(path, "r") as f:
        n = len(f[defs.LOC_SUBJECT])
        group = defs.LOC_DATA_PLACEHOLDER.format(category)
        return [f[f"{group}/{defs.subject_index_to_str(s, n)}"][()] for s in range(n)]


def _check_windows(samples: list[dict[str, Any]], path: Path, patch: tuple[int, ...]) -> int:
    """Asserts that every sample's arrays are the window of the zero-padded volume its index expression names;
    returns how many windows reach past the volume."""
    padded = {
        c: [np.pad(v, [(p, p) for p in patch] + [(0, 0)]) for v in _volumes(path, c)] for c in ("images", "labels")
    }
    borders = 0
    for sample in samples:
        s = sample[defs.KEY_SUBJECT_INDEX]
        window = sample[defs.KEY_INDEX_EXPR].expression
        assert [w.stop - w.start for w in window] == list(patch)
        shape = padded["images"][s].shape
        borders += any(w.start < 0 or w.stop > d - 2 * p for w, d, p in zip(window, shape, patch, strict=False))
        shifted = tuple(slice(w.start + p, w.stop + p) for w, p in zip(window, patch, strict=True))
        for category in ("images", "labels"):
            assert sample[category].shape == (*patch, padded[category][s].shape[-1])
            np.testing.assert_array_equal(sample[category], padded[category][s][shifted])
    return borders


SAMPLERS = {
    "uniform": extr.UniformSampler((9, 10, 12), samples_per_volume=12),
    "label": extr.LabelSampler((8, 8, 8), {0: 0.2, 1: 0.3, 2: 0.5}, samples_per_volume=12),
    "positive-negative": extr.PositiveNegativeSampler((16, 6, 9), positive=2.0, samples_per_volume=12),
    "weighted-mask": extr.WeightedSampler((7, 7, 7), "mask", samples_per_volume=12),
    "weighted-labels": extr.WeightedSampler((5, 30, 5), "labels", "GT", samples_per_volume=12),
}
MASKLESS = ("weighted-mask", "phantom")  # the phantom has no mask category


CASES = [(kind, name) for kind in SAMPLERS for name in ("tiny", "vary", "phantom") if (kind, name) != MASKLESS]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_sampled_patches_are_windows_of_the_padded_volume(
    client: pw.Client, paths: dict[str, Path], kind: str, name: str
) -> None:
    sampler = SAMPLERS[kind]
    with closing(client.datasource(name, sampler, EXTRACTOR)) as ds:
        subjects = len(ds.get_subjects())
        assert len(ds) == subjects * 12
        samples = ds.get_samples(list(range(len(ds))), seed=4, epoch=2)
    assert [s[defs.KEY_SUBJECT_INDEX] for s in samples] == [i // 12 for i in range(len(samples))]
    borders = _check_windows(samples, paths[name], sampler.patch_size)
    if kind == "uniform":
        assert borders > 0


def test_an_epoch_streams_every_subjects_patches(client: pw.Client, paths: dict[str, Path]) -> None:
    sampler = extr.LabelSampler((6, 6, 6), samples_per_volume=5)
    with closing(client.datasource("vary", sampler, EXTRACTOR)) as ds:
        epoch = list(ds.samples(seed=9, epoch=0))
        shuffled = list(ds.samples(shuffle=True, seed=9, epoch=0))
        direct = ds.get_samples(list(range(len(ds))), seed=9, epoch=0)
    assert len(epoch) == 3 * 5 == len(ds)
    assert [s["sample_index"] for s in epoch] == list(range(15))
    assert sorted(s["sample_index"] for s in shuffled) == list(range(15))
    _check_windows(epoch, paths["vary"], (6, 6, 6))
    # a patch depends on (seed, epoch, sample index) only: streamed, shuffled or read directly, it is the same
    by_index = {s["sample_index"]: s for s in shuffled}
    for a, b in zip(epoch, direct, strict=True):
        for other in (b, by_index[a["sample_index"]]):
            assert a[defs.KEY_INDEX_EXPR] == other[defs.KEY_INDEX_EXPR]
            for category in ("images", "labels"):
                assert a[category].tobytes() == other[category].tobytes()


def test_epochs_and_seeds_draw_other_patches_and_repeat_exactly(client: pw.Client) -> None:
    sampler = extr.UniformSampler((5, 5, 5), samples_per_volume=20)

    def batches(seed: int, epoch: int) -> list[dict[str, Any]]:
        with closing(client.datasource("tiny", sampler, EXTRACTOR)) as ds:
            return list(ds.batches(batch_size=8, seed=seed, epoch=epoch))

    def windows(batch_list: list[dict[str, Any]]) -> list[str]:
        return [repr(e.expression) for b in batch_list for e in b[defs.KEY_INDEX_EXPR]]

    first, again = batches(1, 0), batches(1, 0)
    assert sum(len(b["sample_index"]) for b in first) == 60
    for a, b in zip(first, again, strict=True):
        assert windows([a]) == windows([b])
        assert a["images"].tobytes() == b["images"].tobytes() and a["labels"].tobytes() == b["labels"].tobytes()
    for other in (batches(1, 1), batches(2, 0)):
        same = sum(x == y for x, y in zip(windows(first), windows(other), strict=True))
        assert same < 6, same  # chance agreements of uniform centres only


def test_label_sampler_centres_patches_on_the_label(client: pw.Client) -> None:
    """Phantom label 4 (amygdala) is a small structure: every patch's centre voxel holds it."""
    patch = (9, 8, 7)
    sampler = extr.LabelSampler(patch, {4: 1.0}, samples_per_volume=30)
    with closing(client.datasource("phantom", sampler, EXTRACTOR)) as ds:
        samples = ds.get_samples(list(range(len(ds))), seed=0, epoch=5)
    centre = tuple(p // 2 for p in patch)
    assert all(s["labels"][(*centre, 0)] == 4 for s in samples)
    assert len({repr(s[defs.KEY_INDEX_EXPR]) for s in samples}) > 10  # among its few dozen voxels


def test_spec_errors_reach_the_client(client: pw.Client) -> None:
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "patch_sampling.label.probabilities"):
        client.datasource("tiny", extr.LabelSampler(4, {1: -1.0}), EXTRACTOR).get_samples([0])
    with expect(pw.NotFoundError, grpc.StatusCode.NOT_FOUND, "weighted.probability_map.category", "'nope'"):
        client.datasource("tiny", extr.WeightedSampler(4, "nope"), EXTRACTOR).get_samples([0])
    with expect(pw.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "one size per spatial axis"):
        client.datasource("tiny", extr.UniformSampler((4, 4)), EXTRACTOR).get_samples([0])


def test_assembly_refuses_sampled_patches(stub: Any) -> None:
    spec = spec_pb2.DatasourceSpec(dataset="tiny", indexing_strategy=extr.UniformSampler(4)._to_proto())
    entry = apb.OutputEntry(name="seg", channels=1, dtype=tensor_pb2.DATA_TYPE_FLOAT32)
    request = apb.CreateJobRequest(spec=spec, entries=[entry], overlap_mode=apb.OVERLAP_MODE_AVERAGE)
    with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "patch_sampling", "deterministic indexing strategy"):
        stub.CreateJob(request, timeout=RPC_TIMEOUT_S)
