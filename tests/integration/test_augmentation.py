"""Augmentation on a real server: a sample's random transforms depend on (seed, epoch, position) only, so GetSamples
and streams repeat byte for byte, change from epoch to epoch, and do not depend on how an epoch is sharded."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import augmentation as aug
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm

SLICES = 3 * 20  # tiny: three subjects of 20 axial slices of 24 x 16


@pytest.fixture(scope="module")
def ds(client: pw.Client) -> pw.RemoteDatasource:
    transform = tfm.ComposeTransform(
        [
            aug.RandomFlip(),
            aug.RandomRotation90(axes=(0, 1), p=0.0),  # never: the slices are not square
            aug.RandomAffine(degrees=15, translation=2, interpolation="nearest"),
            aug.RandomElastic(num_control_points=5, max_displacement=2.0),
            aug.RandomNoise(std=(0.5, 1.0)),
            aug.RandomCrop((16, 12)),
        ]
    )
    return client.datasource(
        "tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS)), transform
    )


def _arrays(sample: dict[str, Any]) -> tuple[bytes, bytes]:
    return sample[defs.KEY_IMAGES].tobytes(), sample[defs.KEY_LABELS].tobytes()


def _by_index(batches: list[dict[str, Any]]) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    for batch in batches:
        for row, index in enumerate(batch[defs.KEY_SAMPLE_INDEX]):
            out[int(index)] = (batch[defs.KEY_IMAGES][row].tobytes(), batch[defs.KEY_LABELS][row].tobytes())
    return out


def test_get_samples_repeat_for_a_seed_and_epoch_and_change_with_either(ds: pw.RemoteDatasource) -> None:
    indices = [0, 7, 21, 45, 59]
    first = ds.get_samples(indices, seed=3, epoch=1)
    for sample in first:
        assert sample[defs.KEY_IMAGES].shape == (16, 12, 2) and sample[defs.KEY_IMAGES].dtype == np.float32
        assert sample[defs.KEY_LABELS].shape == (16, 12, 1) and sample[defs.KEY_LABELS].dtype == np.uint8
        assert set(np.unique(sample[defs.KEY_LABELS])) <= {0, 1, 2, 3}
    again = ds.get_samples(indices, seed=3, epoch=1)
    assert [_arrays(s) for s in again] == [_arrays(s) for s in first]
    for other in (ds.get_samples(indices, seed=3, epoch=2), ds.get_samples(indices, seed=4, epoch=1)):
        for a, b in zip(first, other, strict=True):
            assert _arrays(a)[0] != _arrays(b)[0]  # the noise differs, at least
    # one sample alone is the same as within a call; ds[i] is seed 0, epoch 0
    assert _arrays(ds.get_samples([21], seed=3, epoch=1)[0]) == _arrays(first[2])
    assert _arrays(ds[7]) == _arrays(ds.get_samples([7])[0])


def test_a_stream_repeats_for_a_seed_and_epoch_and_changes_with_the_epoch(ds: pw.RemoteDatasource) -> None:
    first = _by_index(list(ds.batches(batch_size=4, shuffle=True, seed=9, epoch=2)))
    assert sorted(first) == list(range(SLICES))
    assert _by_index(list(ds.batches(batch_size=4, shuffle=True, seed=9, epoch=2))) == first
    other = _by_index(list(ds.batches(batch_size=4, shuffle=True, seed=9, epoch=3)))
    assert all(other[i][0] != first[i][0] for i in range(SLICES))


def test_an_epoch_is_the_same_whatever_its_sharding_and_batching(ds: pw.RemoteDatasource) -> None:
    whole = _by_index(list(ds.batches(batch_size=5, shuffle=True, seed=1, epoch=4)))
    shards: dict[int, tuple[bytes, bytes]] = {}
    for shard in range(3):
        shards.update(
            _by_index(list(ds.batches(batch_size=2, shuffle=True, seed=1, epoch=4, shard_index=shard, shard_count=3)))
        )
    assert shards == whole


def test_an_unshuffled_stream_equals_get_samples(ds: pw.RemoteDatasource) -> None:
    """Without shuffling a sample's position in the epoch is its index, which seeds GetSamples."""
    streamed = _by_index(list(ds.batches(batch_size=8, seed=5, epoch=6)))
    fetched = ds.get_samples(list(range(SLICES)), seed=5, epoch=6)
    assert [streamed[i] for i in range(SLICES)] == [_arrays(s) for s in fetched]
