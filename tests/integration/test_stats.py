"""LoaderStats against a real server: streams, fetches and DataLoaders with and without workers report every sample
in the main process."""

from __future__ import annotations

import pytest
import torch.utils.data as torch_data

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client.torch import PytorchDatasetAdapter, PytorchStreamingDataset

SLICE_BYTES = 24 * 16 * 2 * 4  # one float32 slice of the tiny dataset, 2 channels


@pytest.fixture
def datasource(client: pw.Client) -> pw.RemoteDatasource:
    return client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,)))


def test_a_streaming_epoch(datasource: pw.RemoteDatasource) -> None:
    batches = sum(1 for _ in datasource.batches(batch_size=4, shuffle=True))
    s = datasource.stats.snapshot()
    assert (s.samples, s.bytes, s.waits) == (len(datasource), len(datasource) * SLICE_BYTES, batches)
    assert 0 < s.wait_seconds <= s.loop_seconds and s.p50 <= s.p90 <= s.p99
    assert f"{len(datasource)} samples" in datasource.stats.summary()


def test_fetches_and_reset(datasource: pw.RemoteDatasource) -> None:
    datasource[3]
    datasource.get_samples([0, 1, 2])
    assert (datasource.stats.snapshot().samples, datasource.stats.snapshot().waits) == (4, 2)
    datasource.stats.reset()
    sum(1 for _ in datasource.samples())
    s = datasource.stats.snapshot()
    assert (s.samples, s.bytes, s.waits) == (len(datasource), len(datasource) * SLICE_BYTES, len(datasource))


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_data_loader(datasource: pw.RemoteDatasource, workers: int) -> None:
    adapter = PytorchDatasetAdapter(datasource)
    loader = torch_data.DataLoader(adapter, batch_size=2, shuffle=True, num_workers=workers)
    seen = sum(len(batch[defs.KEY_SAMPLE_INDEX]) for batch in adapter.stats.timed(loader))
    s = adapter.stats.snapshot()
    assert adapter.stats is datasource.stats
    assert seen == s.samples == len(datasource) and s.bytes == len(datasource) * SLICE_BYTES
    assert s.waits == len(loader) and 0 < s.wait_seconds <= s.loop_seconds


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_data_loader(datasource: pw.RemoteDatasource, workers: int) -> None:
    stream = PytorchStreamingDataset(datasource, batch_size=4)
    loader = torch_data.DataLoader(stream, batch_size=None, num_workers=workers)
    batches = list(stream.stats.timed(loader))
    s = stream.stats.snapshot()
    assert s.samples == len(datasource) and s.bytes == len(datasource) * SLICE_BYTES
    assert s.waits == len(batches)  # the loop's waits, not the workers' (nor, without workers, the stream's too)


def test_tensorflow_dataset(datasource: pw.RemoteDatasource) -> None:
    pytest.importorskip("tensorflow")
    from patchwire.client.tensorflow import get_tf_dataset

    dataset = get_tf_dataset(datasource, batch_size=4)  # infers its signature from a few fetched samples
    datasource.stats.reset()
    batches = sum(1 for _ in datasource.stats.timed(dataset))
    s = datasource.stats.snapshot()
    assert (s.samples, s.bytes, s.waits) == (len(datasource), len(datasource) * SLICE_BYTES, batches)
