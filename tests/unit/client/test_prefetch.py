"""Streams decode ahead of their consumer in a thread: same batches in the same order, bounded, errors raised where
they happened, and nothing left running when the consumer stops early."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client._prefetch import prefetched


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


def test_the_producer_stays_within_the_window() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(50):
            produced.append(i)
            yield i

    closed: list[bool] = []
    items = prefetched(source, 3, lambda: closed.append(True))
    assert next(items) == 0
    time.sleep(0.3)  # time enough to run ahead, if the window let it
    # taken: 1; queued: at most 3; one more made and waiting to be queued
    assert len(produced) <= 1 + 3 + 1
    assert list(items) == list(range(1, 50))
    assert closed == [True]


def test_an_error_is_raised_where_it_happened() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise LookupError("the third item is missing")

    items = prefetched(source, 2, lambda: None)
    assert next(items) == 1
    assert next(items) == 2
    with pytest.raises(LookupError, match="the third item"):
        next(items)
    assert not _prefetch_threads()
