"""torch and TensorFlow adapters against real servers: DataLoader workers (forked after the parent talked to the
server), the streaming IterableDataset and tf.data with an inferred signature."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data as torch_data

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.client.torch import PytorchDatasetAdapter, PytorchStreamingDataset

from _servers import server_subprocess


@pytest.fixture(scope="module")
def remote_address(tiny_h5: Path, vary_h5: Path) -> Iterator[str]:
    """A server in a child process: DataLoader workers fork this process, which must not host a server."""
    with server_subprocess({"tiny": tiny_h5, "vary": vary_h5}) as address:
        yield address


def _datasource(address: str, dataset: str = "tiny") -> pw.RemoteDatasource:
    return pw.connect(address).datasource(
        dataset,
        extr.SliceIndexing(),
        extr.ComposeExtractor(
            [extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS)), extr.SubjectExtractor()]
        ),
        tfm.Permute(permutation=(2, 0, 1), entries=(defs.KEY_IMAGES,)),
    )


def test_dataloader_with_forked_workers_matches_direct_reads(remote_address: str) -> None:
    ds = _datasource(remote_address)
    expected = {i: ds[i] for i in range(len(ds))}  # the parent uses its channel before the workers fork
    loader = torch_data.DataLoader(
        PytorchDatasetAdapter(ds), batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(3)
    )
    seen: list[int] = []
    for batch in loader:
        assert batch[defs.KEY_IMAGES].shape[1:] == (2, 24, 16) and batch[defs.KEY_IMAGES].dtype == torch.float32
        assert isinstance(batch[defs.KEY_SUBJECT], list)
        for row, i in enumerate(batch[defs.KEY_SAMPLE_INDEX].tolist()):
            assert np.array_equal(batch[defs.KEY_IMAGES][row].numpy(), expected[i][defs.KEY_IMAGES])
            assert np.array_equal(batch[defs.KEY_LABELS][row].numpy(), expected[i][defs.KEY_LABELS])
            assert batch[defs.KEY_SUBJECT][row] == expected[i][defs.KEY_SUBJECT]
            assert batch[defs.KEY_SUBJECT_INDEX][row].item() == expected[i][defs.KEY_SUBJECT_INDEX]
            seen.append(i)
    assert sorted(seen) == list(range(len(ds))) and seen != sorted(seen)
    assert ds[0][defs.KEY_SAMPLE_INDEX] == 0  # and the parent still works after the fork


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_dataset_covers_the_epoch_once(remote_address: str, workers: int) -> None:
    ds = _datasource(remote_address)
    stream = PytorchStreamingDataset(ds, batch_size=8, shuffle=True, seed=5)
    loader = torch_data.DataLoader(stream, batch_size=None, num_workers=workers)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        seen: list[int] = []
        for batch in loader:
            assert isinstance(batch[defs.KEY_IMAGES], torch.Tensor) and batch[defs.KEY_IMAGES].shape[1:] == (2, 24, 16)
            assert batch[defs.KEY_SAMPLE_INDEX].dtype == torch.int64
            assert batch[defs.KEY_SUBJECT_INDEX].dtype == torch.int64
            assert len(batch[defs.KEY_SUBJECT]) == len(batch[defs.KEY_SAMPLE_INDEX]) <= 8
            first = batch[defs.KEY_SAMPLE_INDEX][0].item()
            assert np.array_equal(batch[defs.KEY_IMAGES][0].numpy(), ds[first][defs.KEY_IMAGES])
            seen.extend(batch[defs.KEY_SAMPLE_INDEX].tolist())
        assert sorted(seen) == list(range(len(ds)))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    assert len(stream) == 8  # 60 samples in batches of 8, last one short


def test_streaming_dataset_rejects_bad_shards(remote_address: str) -> None:
    with pytest.raises(ValueError, match="shard_index"):
        PytorchStreamingDataset(_datasource(remote_address), shard_index=2, shard_count=2)


def test_tf_dataset_signature_and_values(remote_address: str) -> None:
    tf = pytest.importorskip("tensorflow")
    from patchwire.client.tensorflow import get_tf_dataset, infer_output_signature

    ds = pw.connect(remote_address).datasource(
        "vary",
        extr.SliceIndexing((0, 2)),
        extr.ComposeExtractor(
            [
                extr.DataExtractor(categories=(defs.KEY_IMAGES,)),
                extr.SubjectExtractor(),
                extr.ImagePropertiesExtractor(),
            ]
        ),
    )
    signature = infer_output_signature(ds)
    # axis-0 slices are 24x16x2, axis-2 slices (20+2i)x24x2: both spatial dims vary; image properties are left out
    assert signature[defs.KEY_IMAGES] == tf.TensorSpec(shape=[None, None, 2], dtype=tf.float32)
    assert signature[defs.KEY_SUBJECT] == tf.TensorSpec(shape=(), dtype=tf.string)
    assert signature[defs.KEY_SAMPLE_INDEX] == tf.TensorSpec(shape=(), dtype=tf.int64)
    assert defs.KEY_PROPERTIES not in signature
    count = 0
    for sample in get_tf_dataset(ds).take(70):
        i = int(sample[defs.KEY_SAMPLE_INDEX])
        assert i == count
        assert np.array_equal(sample[defs.KEY_IMAGES].numpy(), ds[i][defs.KEY_IMAGES])
        count += 1
    assert count == 70
    batched = get_tf_dataset(
        pw.connect(remote_address).datasource(
            "tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,))
        ),
        batch_size=16,
    )
    shapes = [tuple(b[defs.KEY_IMAGES].shape) for b in batched]
    assert shapes == [(16, 24, 16, 2)] * 3 + [(12, 24, 16, 2)]
