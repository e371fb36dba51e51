"""The map-style adapter's batched fetches and read-ahead through torch's DataLoader: exactly the samples a plain
loop over ``ds[i]`` gives, in the sampler's order, with and without shuffling and forked workers."""

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
from patchwire.client.torch import PytorchDatasetAdapter

from _servers import server_subprocess

CASES = [(False, 0), (True, 0), (False, 2), (True, 2)]


@pytest.fixture(scope="module")
def remote_address(tiny_h5: Path) -> Iterator[str]:
    """A server in a child process: DataLoader workers fork this process, which must not host a server."""
    with server_subprocess({"tiny": tiny_h5}) as address:
        yield address


def _loader(dataset: object, shuffle: bool, workers: int) -> torch_data.DataLoader[object]:
    return torch_data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=2,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(5),
    )


@pytest.mark.parametrize("indexing", [extr.SliceIndexing(), extr.PatchWiseIndexing((4, 8, 8))], ids=["slice", "patch"])
def test_dataloader_yields_what_a_plain_loop_yields(remote_address: str, indexing: extr.IndexingStrategy) -> None:
    client = pw.connect(remote_address)
    permutation = (2, 0, 1) if isinstance(indexing, extr.SliceIndexing) else (3, 0, 1, 2)
    ds = client.datasource(
        "tiny",
        indexing,
        extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS)),
        tfm.Permute(permutation=permutation, entries=(defs.KEY_IMAGES,)),
    )
    expected = [ds[i] for i in range(len(ds))]
    adapter = PytorchDatasetAdapter(ds)
    for shuffle, workers in CASES * 2:  # again: workers fork while the parent's read-ahead thread has run
        order = [b.tolist() for b in _loader(range(len(ds)), shuffle, workers)]
        batches = list(_loader(adapter, shuffle, workers))
        assert [b[defs.KEY_SAMPLE_INDEX].tolist() for b in batches] == order, (shuffle, workers)
        for batch, indices in zip(batches, order, strict=True):
            for key in (defs.KEY_IMAGES, defs.KEY_LABELS):
                want = np.stack([expected[i][key] for i in indices])
                assert batch[key].numpy().dtype == want.dtype
                assert np.array_equal(batch[key].numpy(), want), (shuffle, workers, key, indices)
    assert [adapter[i][defs.KEY_SAMPLE_INDEX] for i in range(len(ds))] == list(range(len(ds)))
    client.close()


def test_a_new_transform_is_not_served_from_the_old_window(remote_address: str) -> None:
    client = pw.connect(remote_address)
    ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,)))
    adapter = PytorchDatasetAdapter(ds)
    for k in range(3):
        adapter.__getitems__([2 * k, 2 * k + 1])  # the window now holds the next batches, channel-last
    ds.set_transform(tfm.Permute(permutation=(2, 0, 1), entries=(defs.KEY_IMAGES,)))
    (sample, _) = adapter.__getitems__([6, 7])
    assert np.array_equal(sample[defs.KEY_IMAGES], ds[6][defs.KEY_IMAGES])
    client.close()
