"""PyTorch adapters (``pymia.data.backends.pytorch``): a map-style dataset and a streaming iterable dataset.

:class:`PytorchDatasetAdapter` is pymia's: ``DataLoader(PytorchDatasetAdapter(ds), batch_size=..., shuffle=...,
num_workers=...)`` works as with pymia; each worker process opens its own channel (see ``_connection``).

:class:`PytorchStreamingDataset` uses the server's batched stream instead of one call per sample: the server
orders, shards and batches, and the DataLoader is used with ``batch_size=None``::

    stream = PytorchStreamingDataset(ds, batch_size=16, shuffle=True, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=0)
    for epoch in range(10):
        stream.set_epoch(epoch)
        for batch in loader: ...

``num_workers=0`` is what the benchmark measures (decoding already runs ahead in a thread, ``prefetch``); on its
2-core machine workers cost more than they give (README, Benchmarks). Measure on yours.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data as torch_data

from patchwire.client._datasource import PREFETCH_MESSAGES, RemoteDatasource
from patchwire.client._readahead import ReadAhead, sample_bytes
from patchwire.client._shuffle_order import ShuffleOrder
from patchwire.client._stats import LoaderStats

__all__ = ["PytorchDatasetAdapter", "PytorchStreamingDataset", "collate_batch"]


class PytorchDatasetAdapter(torch_data.Dataset[dict[str, Any]]):
    """A map-style torch Dataset over a RemoteDatasource: ``len`` and ``[i]`` as the datasource.

    ``__getitems__`` (used by torch's DataLoader for a whole batch) fetches the batch in one call. ``read_ahead``:
    requests that follow a steady pattern (sequential, or every k-th batch in a DataLoader worker) are fetched ahead
    in a bounded window by a background thread, per process; so are the batches of a shuffling DataLoader
    (``shuffle=True``, with or without workers), whose order is predicted from the torch generator states seen at
    ``len`` and at the workers' start (``_shuffle_order``), a hint checked against each request. False fetches each
    request when it is made.
    """

    def __init__(self, datasource: RemoteDatasource, read_ahead: bool = True) -> None:
        self.datasource = datasource
        self.read_ahead = read_ahead
        self._window: tuple[object, ReadAhead[dict[str, Any]]] | None = None
        self._order = ShuffleOrder()

    def __len__(self) -> int:
        if self.read_ahead:
            self._order.observe()  # a shuffling sampler draws its order right after asking for the length
        return len(self.datasource)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.read_ahead:
            return self.datasource[index]
        return self.__getitems__([operator.index(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """``[self[i] for i in indices]`` in one call (or from the read-ahead window)."""
        if not self.read_ahead:
            return self.datasource.get_samples(list(indices))
        spec = self.datasource._spec  # a new spec (set_transform, ...) makes what was read ahead stale
        if self._window is None or self._window[0] is not spec:
            if self._window is not None:
                self._window[1].stop()
            n = len(self.datasource)
            window = ReadAhead(
                self.datasource.get_samples,
                n,
                sample_bytes,
                fetch_ahead=self._ahead,
                predict=lambda request: self._order.predict(request, n),
            )
            self._window = (spec, window)
        return self._window[1].get(indices)

    def _ahead(self, indices: list[int]) -> list[dict[str, Any]]:
        """A read-ahead fetch: its samples count in the statistics, but the loop does not wait for it."""
        with self.datasource.stats.untimed():
            return self.datasource.get_samples(indices)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_window": None}  # a window and its thread belong to one process

    @property
    def stats(self) -> LoaderStats:
        """The datasource's statistics; DataLoader workers add to them (``stats.timed(loader)`` times the loop)."""
        return self.datasource.stats


def collate_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A streamed batch as torch's default_collate would give it: stacked arrays become tensors (no copy); per-sample
    values are collated by ``default_collate``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(value)
        else:
            out[key] = torch_data.default_collate(list(value))
    return out


class PytorchStreamingDataset(torch_data.IterableDataset[dict[str, Any]]):
    """Batches streamed by the server, for ``DataLoader(stream, batch_size=None, num_workers=N)``.

    The epoch's order depends on (``seed``, epoch) only; this process's share is shard ``shard_index`` of
    ``shard_count`` (e.g. the distributed rank and world size), and DataLoader workers split it further, so the
    number of workers, ranks or replicas changes which consumer gets a sample, never the epoch's contents.
    ``prefetch``: messages decoded ahead by a background thread while the training step runs (0: none).
    """

    def __init__(
        self,
        datasource: RemoteDatasource,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shard_index: int = 0,
        shard_count: int = 1,
        prefetch: int = PREFETCH_MESSAGES,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        self.datasource = datasource
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.prefetch = prefetch
        self.epoch = 0

    @property
    def stats(self) -> LoaderStats:
        """The datasource's statistics; DataLoader workers add to them (``stats.timed(loader)`` times the loop)."""
        return self.datasource.stats

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration streams (call it before each epoch when shuffling)."""
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        info = torch_data.get_worker_info()
        if info is None:
            return self.shard_index, self.shard_count
        return self.shard_index * info.num_workers + info.id, self.shard_count * info.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, count = self._consumer()
        for batch in self.datasource.batches(
            self.batch_size, self.shuffle, self.seed, self.epoch, index, count, self.drop_last, prefetch=self.prefetch
        ):
            yield collate_batch(batch)

    def __len__(self) -> int:
        """Batches this process's shard yields (without DataLoader workers splitting it further)."""
        n = len(range(self.shard_index, len(self.datasource), self.shard_count))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
