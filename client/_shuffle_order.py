"""The order of a shuffled torch DataLoader, predicted as a hint for the read-ahead window.

``DataLoader(dataset, shuffle=True)`` draws its order in the main process with torch's ``RandomSampler``, which the
dataset never sees. What the sampler does (torch 2.x, ``RandomSampler.__iter__``): it calls ``len(dataset)``, then,
without a generator of its own, draws ``seed`` as one int64 from torch's default CPU generator and yields
``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``; with its own generator (``DataLoader(...,
generator=g)``) it yields ``torch.randperm(n, generator=g)`` directly. So the order follows from a generator's state
at the right moment, and this module keeps a few such states (:class:`Snapshot`):

- at each ``len(dataset)`` (``observe``): the default generator's state, the moment before the sampler draws its seed
  (``len`` is called at other times too, hence several snapshots); where the caller is a ``RandomSampler`` with its
  own generator, that generator's state;
- before every ``fork()`` (an ``os`` fork hook): the same, where a DataLoader iterator that is starting its workers
  is on the call stack, its sampler's generator; a forked worker starts from the main process's state after the
  iterator drew its base seed, which is the state the sampler draws from next;
- when the dataset is pickled (a ``spawn`` worker's copy is pickled at the same moment as a fork would happen).

:meth:`ShuffleOrder.predict` takes a request that was not predicted, finds a snapshot whose order holds it as one
batch (aligned, in order), and returns the batches that follow for this process: every batch after it, or in a
DataLoader worker every ``num_workers``-th (the main process hands batches to its workers round robin). None of this
is a guarantee (another draw from the generator in between, ``persistent_workers``, a custom sampler, a future torch
that orders differently): a prediction is only a hint, each predicted batch is served only for a request that equals
it, and the first request that differs cancels the prediction. Snapshots are taken without touching any generator's
state; orders are computed on private generators.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.utils.data as torch_data
from torch.utils.data import dataloader as torch_dataloader

__all__ = ["ShuffleOrder", "Snapshot"]

#: Snapshots kept from ``len(dataset)`` calls (the sampler's is among the last few).
KEEP = 4
#: Most frames searched for a DataLoader iterator starting its workers when the process forks.
_FORK_FRAMES = 24


class Snapshot:
    """A generator's state from which a RandomSampler's order follows; ``seeded``: the sampler first draws its seed
    from it (the default generator), else the state is the sampler's own generator's."""

    def __init__(self, state: torch.Tensor, seeded: bool) -> None:
        self.state = state
        self.seeded = seeded
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_order": None}  # recomputed where needed

    def same(self, other: Snapshot) -> bool:
        return self.seeded == other.seeded and torch.equal(self.state, other.state)

    def order(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The order of ``n`` indices and its inverse (position of each index), computed once per ``n``."""
        if self._order is None or self._order[0] != n:
            generator = torch.Generator()
            generator.set_state(self.state)
            if self.seeded:
                seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
                generator = torch.Generator()
                generator.manual_seed(seed)
            index = np.int32 if n < 2**31 else np.int64  # (half the memory for any real dataset)
            order = torch.randperm(n, generator=generator).numpy().astype(index)
            inverse = np.empty(n, dtype=index)
            inverse[order] = np.arange(n, dtype=index)
            self._order = (n, order, inverse)
        return self._order[1], self._order[2]


def _sampler_snapshot(sampler: object) -> Snapshot | None:
    generator = getattr(sampler, "generator", None)
    if isinstance(sampler, torch_data.RandomSampler) and isinstance(generator, torch.Generator):
        return Snapshot(generator.get_state(), seeded=False)
    return None


def _current(frames: int) -> list[Snapshot]:
    """The default generator's state, and a shuffling sampler's own generator's if one is found in the ``frames``
    callers of this function's caller (a ``RandomSampler.__iter__`` or a DataLoader iterator's ``__init__``)."""
    found = [Snapshot(torch.random.get_rng_state(), seeded=True)]
    frame: FrameType | None = sys._getframe(1)
    for _ in range(frames):
        if frame is None:
            break
        owner = frame.f_locals.get("self") if frame.f_code.co_name in ("__iter__", "__init__") else None
        if isinstance(owner, torch_dataloader._BaseDataLoaderIter):
            owner = getattr(owner._index_sampler, "sampler", None)
        if (snapshot := _sampler_snapshot(owner)) is not None:
            found.append(snapshot)
            break
        frame = frame.f_back
    return found


_at_fork: list[Snapshot] = []


def _before_fork() -> None:
    """Runs before every ``fork()`` of a process that imported this module: it must never fail the fork."""
    global _at_fork
    try:
        _at_fork = _current(_FORK_FRAMES)
    except Exception:  # a hint only: no snapshot, no prediction
        _at_fork = []


os.register_at_fork(before=_before_fork)


class ShuffleOrder:
    """Snapshots of the generators a shuffling DataLoader draws its order from, and the batches they predict."""

    def __init__(self) -> None:
        self._snapshots: collections.deque[Snapshot] = collections.deque(maxlen=KEEP)

    def observe(self) -> None:
        """Called from the dataset's ``__len__``: keeps the generators' states at that moment (never raises: a hint
        must not fail ``len``)."""
        try:
            snapshots = _current(3)  # this, __len__, its caller
        except Exception:
            return
        for snapshot in snapshots:
            if not any(snapshot.same(kept) for kept in self._snapshots):
                self._snapshots.append(snapshot)

    def __getstate__(self) -> dict[str, Any]:
        snapshots = collections.deque(self._snapshots, maxlen=KEEP)
        snapshots.extend(_current(_FORK_FRAMES))
        return {"_snapshots": snapshots}

    def predict(self, request: tuple[int, ...], n: int) -> Iterator[tuple[int, ...]] | None:
        """The batches this process will request after ``request``, if a snapshot's order of ``range(n)`` holds
        ``request`` as one of its batches, or, in a DataLoader worker, if ``request`` is a batch of the sequential
        order (a DataLoader that does not shuffle); None otherwise."""
        size = len(request)
        if not size or not all(0 <= i < n for i in request):
            return None
        for snapshot in [*_at_fork, *reversed(self._snapshots)]:
            order, inverse = snapshot.order(n)
            start = int(inverse[request[0]])
            if start % size == 0 and tuple(order[start : start + size].tolist()) == request:
                info = torch_data.get_worker_info()
                stride = size * (info.num_workers if info is not None else 1)
                return (tuple(order[s : s + size].tolist()) for s in range(start + stride, n, stride))
        info = torch_data.get_worker_info()
        if info is not None and request[0] % size == 0 and request == tuple(range(request[0], request[0] + size)):
            # a worker of a DataLoader that does not shuffle: every num_workers-th batch of range(n)
            stride = size * info.num_workers
            return (tuple(range(s, min(s + size, n))) for s in range(request[0] + stride, n, stride))
        return None
