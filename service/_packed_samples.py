"""Samples kept compressed: a bounded cache of the samples a server has already compressed for the wire.

A stream that asks for a blosc2 codec (``shuffle-lz4``, ``shuffle-zstd``) costs the server more per sample than
one that does not: the sample is read and extracted, then compressed (about 0.3 CPU s per GB with LZ4). Every epoch
of a training run asks for the same samples again, and so do the other trainers of a shared server. Where a
datasource is deterministic (no random patches, no random transforms: its sample ``i`` is the same in every epoch
and for every client), this cache keeps each sample as it goes on the wire: its arrays as
:class:`~patchwire.wire.compression.Packed` frames (the compressed size, a fifth to a fiftieth of the raw bytes on
skull-stripped images and label maps), its small values as they are. A sample found here is sent as it is: no read,
no extraction, no compression. What the client receives is the same either way (the frames of a sample do not
depend on the batch it travels in: ``compression.frame_pieces``).

Keys: dataset name, the version of its file (``Dataset.generation``), the datasource's spec (a digest of its
serialised form), the sample's index and the request's codecs. A file that changes on disk is a new version: its
old entries are dropped when the server notices (the dataset's listeners) and never match again. Entries are
evicted least recently used first beyond ``capacity_bytes`` (each counts its frames' and arrays' bytes); 0 turns the
cache off. Each serving process has its own, like the block cache (``patchwire serve --packed-cache-mb``).

Random datasources, reads into a client's shared memory and uncompressed streams do not use it: their samples are
built for each request, as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from patchwire.service._randomness import Draw
from patchwire.wire import compression
from patchwire.wire.compression import Packed, Policy

if TYPE_CHECKING:
    from patchwire.service._catalog import Dataset
    from patchwire.service._datasource import CompiledDatasource
    from patchwire.service._served import ServedDataset

__all__ = ["PackedSamples", "Packing"]

#: What an entry costs beyond its bytes (its key, dict and objects), counted against the capacity.
ENTRY_OVERHEAD = 512


class PackedSamples:
    """The cache of one serving process (see the module doc)."""

    def __init__(self, capacity_bytes: int, datasets: Mapping[str, ServedDataset] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[Hashable, tuple[dict[str, Any], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        for served in (datasets or {}).values():
            served.listeners.append(self._forget)

    def __len__(self) -> int:
        return len(self._items)

    def begin(self, src: CompiledDatasource, policy: Policy) -> Packing | None:
        """The samples of one message of ``src`` under ``policy`` through this cache, or None where it does not
        apply: off, a random datasource, or no blosc2 codec asked for."""
        if self.capacity_bytes <= 0 or not src.deterministic:
            return None
        if not (compression.framed(policy.integer) or compression.framed(policy.other)):
            return None
        return Packing(self, src, policy)

    def _get(self, key: Hashable) -> dict[str, Any] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def _put(self, key: Hashable, sample: dict[str, Any]) -> None:
        size = ENTRY_OVERHEAD + sum(_held_bytes(v) for v in sample.values())
        if size > self.capacity_bytes:
            return
        with self._lock:
            previous = self._items.pop(key, None)
            if previous is not None:
                self.nbytes -= previous[1]
            self._items[key] = (sample, size)
            self.nbytes += size
            while self.nbytes > self.capacity_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.nbytes -= evicted

    def _forget(self, served: ServedDataset, retired: Dataset | None) -> None:
        """A dataset's file changed or became unusable: its entries (of the retired version, or all) go."""
        with self._lock:
            for key in [k for k in self._items if _of(k, served.name, retired)]:
                self.nbytes -= self._items.pop(key)[1]


class Packing:
    """The samples of one message: :meth:`sample` gives a cached sample (packed) or builds it; :meth:`finish`
    packs the ones it built, on the policy's threads, and keeps them."""

    def __init__(self, cache: PackedSamples, src: CompiledDatasource, policy: Policy) -> None:
        self._cache = cache
        self._src = src
        self._policy = policy
        self._prefix = (src.dataset.name, src.dataset.generation, src.digest, policy.integer, policy.other)
        self._built: dict[int, Hashable] = {}  # id of a sample built here -> its key

    def sample(self, index: int, draw: Draw) -> dict[str, Any]:
        """Sample ``index`` (negative counts from the end): the cached one, or one built now (``src.sample``)."""
        key = (*self._prefix, draw.index)
        hit = self._cache._get(key)
        if hit is not None:
            return hit
        sample = self._src.sample(index, draw)
        self._built[id(sample)] = key
        return sample

    def finish(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``samples`` with those built by :meth:`sample` packed (and kept): their arrays compressed in parallel on
        the policy's threads, small arrays copied (they may view the block cache, whose bytes it accounts for)."""
        fresh = [i for i, s in enumerate(samples) if id(s) in self._built]
        if not fresh:
            return list(samples)
        threads = self._policy.threads
        if threads is None or len(fresh) == 1:
            made = [_pack(samples[i], self._policy) for i in fresh]
        else:  # spread over the threads as a payload's frames are, each sample compressed on one of them
            serial = Policy(self._policy.integer, self._policy.other)
            groups = compression.task_groups(fresh, lambda i: sum(_held_bytes(v) for v in samples[i].values()))
            packed_groups = threads.map(lambda group: [_pack(samples[i], serial) for i in group], groups)
            made = [sample for group in packed_groups for sample in group]
        out = list(samples)
        for i, packed in zip(fresh, made, strict=True):
            self._cache._put(self._built.pop(id(samples[i])), packed)
            out[i] = packed
        return out


def _pack(sample: Mapping[str, Any], policy: Policy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            packed = compression.pack(value, policy)
            if packed is None:
                value = np.array(value)  # its own copy, read-only: shared by every stream that gets it
                value.setflags(write=False)
            else:
                value = packed
        out[key] = value
    return out


def _held_bytes(value: Any) -> int:
    if isinstance(value, Packed):
        return value.packed_nbytes
    if isinstance(value, np.ndarray | np.generic):
        return int(value.nbytes)
    return 64


def _of(key: Hashable, name: str, retired: Dataset | None) -> bool:
    assert isinstance(key, tuple)
    return bool(key[0] == name and (retired is None or key[1] == retired.generation))
