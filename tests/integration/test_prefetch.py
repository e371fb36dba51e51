"""Prefetching streams against a real server: the same batches with and without it, and an early stop that
cancels the stream and leaves no thread behind."""

from __future__ import annotations

import threading

import numpy as np

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "patchwire-prefetch"]


def test_batches_are_the_same_with_and_without_prefetch(client: pw.Client) -> None:
    ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=("images", "labels")))
    runs = {depth: list(ds.batches(batch_size=4, shuffle=True, seed=3, epoch=1, prefetch=depth)) for depth in (0, 1, 3)}
    for depth in (1, 3):
        assert len(runs[depth]) == len(runs[0])
        for got, want in zip(runs[depth], runs[0], strict=True):
            assert got.keys() == want.keys()
            for key in want:
                assert np.array_equal(got[key], want[key]), key
    assert sorted(np.concatenate([b[defs.KEY_SAMPLE_INDEX] for b in runs[0]])) == list(range(len(ds)))
    assert not _prefetch_threads()


def test_stopping_early_cancels_the_stream_and_ends_the_thread(client: pw.Client) -> None:
    ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor())
    batches = ds.batches(batch_size=1)
    first = next(batches)
    assert first[defs.KEY_IMAGES].shape[0] == 1
    batches.close()
    assert not _prefetch_threads()
    assert len(list(ds.batches(batch_size=8))) == -(-len(ds) // 8)  # the connection is still usable
