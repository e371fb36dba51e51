"""PyTorch adapters (``pymia.data.backends.pytorch``): a map-style dataset and a streaming iterable dataset.

:class:`PytorchDatasetAdapter` is pymia's: ``DataLoader(PytorchDatasetAdapter(ds), batch_size=..., shuffle=...,
num_workers=...)`` works as with pymia; each worker process opens its own channel (see ``_connection``).
``adapter.set_epoch(epoch)`` (and ``seed``) select the randomness of the server's patch sampling and random
transforms, so each epoch sees new patches and augmentations (DataLoader workers see the new epoch too, persistent
ones included).

:class:`PytorchStreamingDataset` uses the server's batched stream instead of one call per sample: the server
orders, shards and batches, and the DataLoader is used with ``batch_size=None``::

    stream = PytorchStreamingDataset(ds, batch_size=16, shuffle=True, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in range(10):
        stream.set_epoch(epoch)
        for batch in loader: ...

**The epoch.** An epoch's global order (and each sample's randomness: patches, augmentation) depends on (``seed``,
epoch) alone. ``set_epoch`` reaches DataLoader workers, persistent or not, forked or spawned: the epoch lives in a
shared-memory tensor that each worker reads when its iteration starts.

**DDP.** Create the stream after ``torch.distributed.init_process_group``: its rank and world size are then the
shard (``shard_index`` and ``shard_count`` override them). Rank r streams positions r, r + world, ... of the
global order, and every rank streams the same number of batches (DDP would hang otherwise):
``shard_balance="pad"`` (the default, as torch's DistributedSampler) repeats the order's first samples to even the
shards out, ``"drop"`` drops its last ones, ``"none"`` lets shards differ by one sample. DataLoader workers take
the rank's batches round robin (worker w the batches w, w + num_workers, ..., which the DataLoader hands on in
that order), so a rank's batches, their contents and order, are the same whatever ``num_workers``, and
``len(stream)`` is the rank's batch count. Keep the DataLoader's ``in_order=True`` (its default).

**Resume.** ``state_dict()`` / ``load_state_dict()`` follow torchdata's ``StatefulDataLoader`` convention, and the
state holds the epoch, the seed and the position (:mod:`._stream_state`)::

    loader = StatefulDataLoader(stream, batch_size=None, num_workers=2)
    ...; checkpoint = {"epoch": epoch, "loader": loader.state_dict()}      # mid-epoch, on any rank
    # later, with the same number of workers and ranks:
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=2)
    loader.load_state_dict(checkpoint["loader"])
    for epoch in range(checkpoint["epoch"], epochs):
        stream.set_epoch(epoch)
        for batch in loader: ...    # the first iteration yields the rest of the saved epoch

The iteration that resumes streams the state's epoch whatever ``set_epoch`` said (keep your own epoch counter in
the checkpoint, as with DistributedSampler, for the epochs after it).

Nothing already consumed is streamed again: each DataLoader worker's stream starts on the server at its cursor
(``start_position``). (That holds for StatefulDataLoader's default ``snapshot_every_n_steps=1``; with n, torchdata
restores its last snapshot and replays the up to n - 1 batches after it, which are then streamed again.) The loader
states of every rank are alike (ranks move in lockstep), so rank 0's is enough.

StatefulDataLoader refuses a state saved with another ``num_workers``. To resume with other numbers of workers or
ranks (elastic, like MosaicML Streaming), load the saved loader state into the stream instead and build a loader
that is given no state::

    stream = PytorchStreamingDataset(ds, batch_size=16, shuffle=True, seed=0)   # in the new world, on each rank
    stream.load_state_dict(checkpoint["loader"])
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=3)        # or a plain DataLoader

The saved state says how many positions of the global order the old ranks consumed together (their batches x
batch size x world size); the next iteration streams the rest of that epoch's global order from there
(``global_start``), shared among the new ranks and workers. A state loaded this way is taken by the stream's next
iteration (in all its workers), unless ``set_epoch`` selects another epoch first. With a plain DataLoader,
``stream.state_dict(consumed_batches=n)`` gives the state after this rank consumed ``n`` batches of the epoch.

**Shapes.** When the samples of a batch differ in shape (subjects of different sizes sliced along a varying axis),
``shapes`` says what to do (:mod:`._batch_shapes`): ``"error"`` (default) raises a ValueError naming the entry,
the shapes seen and the options; ``"pad"`` zero-pads each batch to its largest shape and says so, in
``batch["padded_shapes"]`` (each entry's own shapes, to mask a loss) and once in the log; ``"list"`` gives lists of
per-sample tensors; ``"group"`` makes each batch a list of batches, one per distinct shape, in the order each shape
first appears in the batch (samples keep their order; a list even where the batch has one shape). A rank still
yields one item per batch of its share (groups add no batches), so ranks stay in lockstep; under DDP run the groups'
forward and backward passes under ``model.no_sync()`` except the last one, then step once.

``num_workers=0`` is what the benchmark measures (decoding already runs ahead in a thread, ``prefetch``); on its
2-core machine workers cost more than they give (README, Benchmarks). Measure on yours.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.utils.data as torch_data

from patchwire.client._batch_shapes import PADDED_SHAPES, SHAPES, apply_shapes, varying_entries
from patchwire.client._datasource import PREFETCH_MESSAGES, RemoteDatasource
from patchwire.client._epochs import BALANCES, EpochOptions, epoch_size
from patchwire.client._readahead import ReadAhead, sample_bytes
from patchwire.client._retry import RetryPolicy
from patchwire.client._shuffle_order import ShuffleOrder
from patchwire.client._stats import LoaderStats
from patchwire.client._stream_state import StreamState, rank_batches, rank_state, states_in

__all__ = ["PADDED_SHAPES", "PytorchDatasetAdapter", "PytorchStreamingDataset", "collate_batch"]

logger = logging.getLogger(__name__)

MAX_WORKERS = 256
"""Most DataLoader workers a stream that was given a state with ``load_state_dict`` can hand it to."""

# slots of a stream's shared counters (int64)
_EPOCH, _SERIAL, _PENDING_EPOCH, _PENDING_START, _PENDING_WORKERS = range(5)
_TAKEN = 5  # then one slot per DataLoader worker: the serial of the last loaded state it took
_RETIRED = -1  # _PENDING_WORKERS of a loaded state that set_epoch made obsolete


def _non_negative(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _shared_epoch() -> torch.Tensor:
    """An int64 in shared memory: DataLoader workers (forked, spawned, persistent) read what the main process set."""
    return torch.zeros((), dtype=torch.int64).share_memory_()


NO_RETRY = RetryPolicy(budget_s=0)
"""Read-ahead fetches fail at once: a speculative read never waits out an outage (see :mod:`._readahead`)."""


class PytorchDatasetAdapter(torch_data.Dataset[dict[str, Any]]):
    """A map-style torch Dataset over a RemoteDatasource: ``len`` and ``[i]`` as the datasource.

    ``__getitems__`` (used by torch's DataLoader for a whole batch) fetches the batch in one call. ``read_ahead``:
    requests that follow a steady pattern (sequential, or every k-th batch in a DataLoader worker) are fetched ahead
    in a bounded window by a background thread, per process; so are the batches of a shuffling DataLoader
    (``shuffle=True``, with or without workers), whose order is predicted from the torch generator states seen at
    ``len`` and at the workers' start (``_shuffle_order``), a hint checked against each request. False fetches each
    request when it is made.

    ``seed`` and the epoch (:meth:`set_epoch`) seed the server's patch sampling and random transforms: a sample's
    draws depend on (seed, epoch, index) only, so an epoch is the same whatever the order, batching or workers.
    """

    def __init__(self, datasource: RemoteDatasource, read_ahead: bool = True, seed: int = 0) -> None:
        self.datasource = datasource
        self.read_ahead = read_ahead
        self.seed = _non_negative(seed, "seed")
        self._epoch = _shared_epoch()
        self._window: tuple[object, ReadAhead[dict[str, Any]]] | None = None
        self._order = ShuffleOrder()

    @property
    def epoch(self) -> int:
        """The epoch whose randomness samples are read with (0 until :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reads the samples of ``epoch`` from now on, in this process and its DataLoader workers (persistent ones
        too: the epoch is in shared memory)."""
        self._epoch.fill_(_non_negative(epoch, "epoch"))

    def __len__(self) -> int:
        if self.read_ahead:
            self._order.observe()  # a shuffling sampler draws its order right after asking for the length
        return len(self.datasource)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.read_ahead:
            return self._fetch([operator.index(index)])[0]
        return self.__getitems__([operator.index(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """``[self[i] for i in indices]`` in one call (or from the read-ahead window)."""
        if not self.read_ahead:
            return self._fetch(list(indices))
        # a new spec (set_transform, ...) or another epoch makes what was read ahead stale
        key = (self.datasource._spec, self.seed, self.epoch)
        if self._window is None or self._window[0] != key:
            if self._window is not None:
                self._window[1].stop()
            n = len(self.datasource)
            seed, epoch = self.seed, self.epoch
            window = ReadAhead(
                lambda request: self.datasource.get_samples(request, seed=seed, epoch=epoch),
                n,
                sample_bytes,
                fetch_ahead=lambda request: self._ahead(request, seed, epoch),
                predict=lambda request: self._order.predict(request, n),
            )
            self._window = (key, window)
        return self._window[1].get(indices)

    def _fetch(self, indices: list[int]) -> list[dict[str, Any]]:
        return self.datasource.get_samples(indices, seed=self.seed, epoch=self.epoch)

    def _ahead(self, indices: list[int], seed: int, epoch: int) -> list[dict[str, Any]]:
        """A read-ahead fetch: its samples count in the statistics, but the loop does not wait for it."""
        with self.datasource.stats.untimed():  # not retried: the request that reaches it reads again if it failed
            return self.datasource.get_samples(indices, seed=seed, epoch=epoch, retry=NO_RETRY)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_window": None}  # a window and its thread belong to one process

    @property
    def stats(self) -> LoaderStats:
        """The datasource's statistics; DataLoader workers add to them (``stats.timed(loader)`` times the loop)."""
        return self.datasource.stats


def collate_batch(batch: dict[str, Any], shapes: str = "error") -> Any:
    """A streamed batch as torch's default_collate would give it: stacked arrays become tensors (no copy); per-sample
    values are collated by ``default_collate``. Arrays that differ in shape are handled by ``shapes`` (see the
    module docstring): a dict of tensors, or for ``"group"`` a list of them."""
    shaped = apply_shapes(batch, shapes)
    if isinstance(shaped, list):
        return [_to_torch(group) for group in shaped]
    return _to_torch(shaped)


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(value)
        elif isinstance(value, dict):  # padded_shapes
            out[key] = {k: torch.from_numpy(v) for k, v in value.items()}
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            out[key] = [torch.from_numpy(v) for v in value]  # shapes="list"
        else:
            out[key] = torch_data.default_collate(list(value))
    return out


@dataclass(frozen=True)
class _Start:
    """Where an iteration starts: the epoch, the global positions consumed before it (by anyone), and the batches of
    this consumer's own share consumed before it (a worker resuming its own stream)."""

    epoch: int
    global_start: int = 0
    batches: int = 0


class _Progress:
    """The iteration running in this process: its start and the batches it yielded."""

    def __init__(self, state: StreamState) -> None:
        self.state = state

    def yielded(self) -> None:
        self.state = replace(self.state, batches=self.state.batches + 1)


class PytorchStreamingDataset(torch_data.IterableDataset[Any]):
    """Batches streamed by the server, for ``DataLoader(stream, batch_size=None, num_workers=N)`` (see the module
    docstring for DDP, resuming and shapes).

    The epoch's global order depends on (``seed``, epoch) only. This process's share is shard ``shard_index`` of
    ``shard_count``: by default the rank and world size of an initialised ``torch.distributed`` process group (else
    0 of 1), evened out by ``shard_balance`` ("pad", "drop" or "none"); DataLoader workers take the shard's batches
    round robin. ``drop_last`` drops a shard's short final batch. ``epoch_options``
    (:class:`patchwire.client._epochs.EpochOptions`): a subset, weighted draws or subject windows (the stream sets
    the balance, the global start and the workers' batch shares itself). ``shapes``: "error", "pad", "list" or
    "group", for batches whose samples differ in shape. ``prefetch``: messages decoded ahead by a background thread
    while the training step runs (0: none).
    """

    def __init__(
        self,
        datasource: RemoteDatasource,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shard_index: int | None = None,
        shard_count: int | None = None,
        prefetch: int = PREFETCH_MESSAGES,
        shard_balance: str = "pad",
        shapes: str = "error",
        epoch_options: EpochOptions | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if shard_balance not in BALANCES:
            raise ValueError(f"shard_balance must be one of {sorted(BALANCES)}, got {shard_balance!r}")
        if shapes not in SHAPES:
            raise ValueError(f"shapes must be one of {SHAPES}, got {shapes!r}")
        options = epoch_options if epoch_options is not None else EpochOptions()
        if options.shard_balance != "none" or options.global_start or tuple(options.batch_shard) != (0, 1):
            raise ValueError(
                "epoch_options: the stream sets shard_balance (its own argument), global_start (load_state_dict) "
                "and batch_shard (DataLoader workers) itself; leave them at their defaults"
            )
        self._shard: tuple[int, int] | None = None
        if shard_index is not None or shard_count is not None:
            index = _non_negative(0 if shard_index is None else shard_index, "shard_index")
            count = _non_negative(1 if shard_count is None else shard_count, "shard_count")
            if not 0 <= index < count:
                raise ValueError(f"shard_index {index} must be in [0, shard_count={count})")
            self._shard = (index, count)
        self.datasource = datasource
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = _non_negative(seed, "seed")
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.shard_balance = shard_balance
        self.shapes = shapes
        self.epoch_options = options
        self._counters = torch.zeros(_TAKEN + MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._loaded: StreamState | None = None  # a worker's own state, from a StatefulDataLoader
        self._progress: _Progress | None = None
        self._told_padding = False
        self._rank_and_world()  # an initialised process group fixes the shard now

    # -- the epoch and the shard ----------------------------------------------------------------------------------

    @property
    def stats(self) -> LoaderStats:
        """The datasource's statistics; DataLoader workers add to them (``stats.timed(loader)`` times the loop)."""
        return self.datasource.stats

    @property
    def epoch(self) -> int:
        """The epoch the next iteration streams (unless it resumes a loaded state), shared with DataLoader workers."""
        return int(self._counters[_EPOCH])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration streams (call it before each epoch), in this process and
        in its DataLoader workers, persistent ones included. A state loaded with :meth:`load_state_dict` and not yet
        taken by an iteration is dropped if ``epoch`` is another epoch than its own."""
        epoch = _non_negative(epoch, "epoch")
        counters = self._counters
        if int(counters[_SERIAL]) and int(counters[_PENDING_EPOCH]) != epoch:
            counters[_PENDING_WORKERS] = _RETIRED
        counters[_EPOCH] = epoch

    def _rank_and_world(self) -> tuple[int, int]:
        if self._shard is None and torch_dist.is_available() and torch_dist.is_initialized():
            self._shard = (torch_dist.get_rank(), torch_dist.get_world_size())
        return self._shard if self._shard is not None else (0, 1)

    @property
    def shard_index(self) -> int:
        """This process's shard: the rank of an initialised process group unless given."""
        return self._rank_and_world()[0]

    @property
    def shard_count(self) -> int:
        """The number of shards: the world size of an initialised process group unless given."""
        return self._rank_and_world()[1]

    @property
    def samples_per_epoch(self) -> int:
        """Positions of an epoch's global order (before shards are balanced)."""
        return epoch_size(len(self.datasource), self.epoch_options)

    def __len__(self) -> int:
        """Batches this rank streams in a whole epoch, whatever the number of DataLoader workers."""
        rank, world = self._rank_and_world()
        return rank_batches(self.samples_per_epoch, 0, rank, world, self.shard_balance, self.batch_size, self.drop_last)

    def __getstate__(self) -> dict[str, Any]:
        self._rank_and_world()  # a spawned DataLoader worker cannot see the process group: fix the shard first
        return {**self.__dict__, "_progress": None}

    # -- iteration ------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = torch_data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_and_world()
        loaded, self._loaded = self._loaded, None
        pending = self._take_pending(worker, workers)
        if loaded is not None:
            start = self._worker_start(loaded, rank, world, worker, workers)
        elif pending is not None:
            start = pending
        else:
            start = _Start(self.epoch)
        progress = _Progress(
            StreamState(
                epoch=start.epoch,
                seed=self.seed,
                shuffle=bool(self.shuffle),
                samples=self.samples_per_epoch,
                batch_size=self.batch_size,
                global_start=start.global_start,
                shard_index=rank,
                shard_count=world,
                worker_index=worker,
                worker_count=workers,
                batches=start.batches,
            )
        )
        self._progress = progress
        return self._stream(progress)

    def _stream(self, progress: _Progress) -> Iterator[Any]:
        state = progress.state
        options = replace(
            self.epoch_options,
            shard_balance=self.shard_balance,
            global_start=state.global_start,
            batch_shard=(state.worker_index, state.worker_count),
        )
        for batch in self.datasource.batches(
            self.batch_size,
            self.shuffle,
            self.seed,
            state.epoch,
            state.shard_index,
            state.shard_count,
            self.drop_last,
            start_position=state.batches * self.batch_size,
            prefetch=self.prefetch,
            epoch_options=options,
        ):
            if self.shapes == "pad" and not self._told_padding and varying_entries(batch):
                self._told_padding = True
                logger.info(
                    "padding batches whose samples differ in shape (%s) with zeros to each batch's largest shape; "
                    "batch[%r] holds the samples' own shapes",
                    ", ".join(varying_entries(batch)),
                    PADDED_SHAPES,
                )
            out = collate_batch(batch, self.shapes)
            progress.yielded()
            yield out

    # -- resume ---------------------------------------------------------------------------------------------------

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """Where this stream stands, as a dict of scalars (:mod:`._stream_state`): the epoch, the seed and the
        position of this process's iteration (what torchdata's StatefulDataLoader saves for each worker, or for the
        main process without workers). ``consumed_batches``: instead, the state after this rank consumed that many
        batches of the current iteration (for a loop over a plain DataLoader, which counts its batches itself)."""
        if consumed_batches is not None:
            rank, world = self._rank_and_world()
            if self._progress is not None and self._progress.state.worker_count == 1:
                start = self._progress.state
                base = _Start(start.epoch, start.global_start)
            else:
                base = self._pending() or _Start(self.epoch)
            return StreamState(
                epoch=base.epoch,
                seed=self.seed,
                shuffle=bool(self.shuffle),
                samples=self.samples_per_epoch,
                batch_size=self.batch_size,
                global_start=base.global_start,
                shard_index=rank,
                shard_count=world,
                worker_index=0,
                worker_count=1,
                batches=_non_negative(consumed_batches, "consumed_batches"),
            ).to_dict()
        if self._progress is not None:
            return self._progress.state.to_dict()
        if self._loaded is not None:
            return self._loaded.to_dict()
        if self._pending() is not None:
            return self.state_dict(consumed_batches=0)
        raise ValueError(
            "this process has not iterated the stream (DataLoader workers do), so it does not know what was consumed: "
            "save a torchdata StatefulDataLoader's state_dict(), or state_dict(consumed_batches=n) with the batches "
            "this rank consumed in the epoch"
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from ``state``: one of this stream's states (:meth:`state_dict`) or a torchdata
        ``StatefulDataLoader.state_dict()`` of a loader over such a stream. The next iteration streams the rest of
        the state's epoch and nothing before it: with the same ranks and workers (a StatefulDataLoader handing each
        worker its own state) each worker's stream starts at its own cursor; otherwise (this method called on the
        stream itself, with any numbers of ranks and workers) the rest of the epoch's global order is shared among
        the ranks and workers there are now."""
        states, extra = states_in(state)
        if torch_data.get_worker_info() is not None:  # torchdata hands each worker the state it saved
            if len(states) != 1 or extra:
                raise ValueError("a DataLoader worker takes one worker's state; load a loader's in the main process")
            self._check(states[0])
            self._loaded = states[0]
            return
        rank = rank_state(states, extra)
        self._check(rank)
        counters = self._counters
        counters[_PENDING_EPOCH] = rank.epoch
        counters[_PENDING_START] = rank.consumed
        counters[_PENDING_WORKERS] = 0
        counters[_SERIAL] += 1

    def _check(self, state: StreamState) -> None:
        mine = (self.seed, bool(self.shuffle), self.samples_per_epoch)
        theirs = (state.seed, state.shuffle, state.samples)
        if mine != theirs:
            raise ValueError(
                f"the state is of another stream: seed, shuffle and epoch size {theirs}, this stream's {mine} "
                "(a resumed epoch must have the same global order)"
            )

    def _pending(self) -> _Start | None:
        """A state loaded with :meth:`load_state_dict` that set_epoch has not made obsolete."""
        counters = self._counters
        if not int(counters[_SERIAL]) or int(counters[_PENDING_WORKERS]) == _RETIRED:
            return None
        return _Start(int(counters[_PENDING_EPOCH]), int(counters[_PENDING_START]))

    def _take_pending(self, worker: int, workers: int) -> _Start | None:
        """The loaded state, if this iteration is the first since it was loaded in this consumer: each of the
        DataLoader workers of the next iteration takes it once (the serial in its slot), and workers of a loader with
        another ``num_workers`` (a later loader) do not."""
        counters = self._counters
        serial = int(counters[_SERIAL])
        if not serial:
            return None
        if worker >= MAX_WORKERS:
            raise ValueError(f"a stream that was given a state resumes in at most {MAX_WORKERS} DataLoader workers")
        taken_by = int(counters[_PENDING_WORKERS])
        if int(counters[_TAKEN + worker]) == serial or taken_by not in (0, workers):
            return None
        counters[_PENDING_WORKERS] = workers
        counters[_TAKEN + worker] = serial
        return _Start(int(counters[_PENDING_EPOCH]), int(counters[_PENDING_START]))

    def _worker_start(self, state: StreamState, rank: int, world: int, worker: int, workers: int) -> _Start:
        """Where a DataLoader worker given its own saved state (by a StatefulDataLoader) starts."""
        if state.worker_count == 1:  # the state of a whole rank: its global cursor serves any number of workers
            return _Start(state.epoch, state.consumed)
        same = (state.shard_index, state.shard_count, state.worker_index, state.worker_count, state.batch_size)
        if same != (rank, world, worker, workers, self.batch_size):
            raise ValueError(
                f"this state is DataLoader worker {state.worker_index} of {state.worker_count}'s on rank "
                f"{state.shard_index} of {state.shard_count} with batches of {state.batch_size}; here it would be "
                f"worker {worker} of {workers} on rank {rank} of {world} with batches of {self.batch_size}. To resume "
                "with other numbers of workers or ranks, call stream.load_state_dict(loader_state) and give the new "
                "loader no state (patchwire.client.torch, Resume)"
            )
        return _Start(state.epoch, state.global_start, state.batches)
