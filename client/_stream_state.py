"""Where a streamed epoch stands: a consumer's progress as a plain dict for checkpoints, and how states combine.

A stream consumer (one rank's DataLoader worker, or a whole rank) takes a share of the epoch's global order, which
depends on (seed, epoch) alone (``service/_epoch_order.py``). Its state names that order and how far the consumer
got in it::

    {"format": "patchwire.stream/1", "epoch": 3, "seed": 0, "shuffle": True, "samples": 60, "batch_size": 4,
     "global_start": 0, "shard_index": 0, "shard_count": 2, "worker_index": 1, "worker_count": 2, "batches": 5}

``global_start`` positions of the order had been consumed (by any number of consumers) before this consumer's
iteration began; since then it yielded ``batches`` batches of its share: every ``worker_count``-th batch of shard
``shard_index`` of ``shard_count``, from batch ``worker_index`` on. The values are scalars, so the dict survives
``torch.save``, JSON and torchdata's incremental worker snapshots.

A rank-level state (``worker_count`` 1) converts to a global cursor: ranks that consumed ``batches`` full batches
each (in lockstep, as DDP does) consumed positions ``[global_start, global_start + batches * batch_size *
shard_count)`` of the order, because the shards interleave position by position. The states of all the workers of
one rank combine into the rank's state: torch's DataLoader yields its workers' batches round robin, and the workers
take the rank's batches round robin, so the rank consumed the sum of their batches. Resuming from a global cursor
works for any number of ranks and workers (the rest of the same global order); a single worker's state can only
resume that same worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from patchwire.client._epochs import shard_samples

__all__ = ["FORMAT", "StreamState", "rank_batches", "states_in"]

FORMAT = "patchwire.stream/1"
"""The ``format`` value of a stream state dict."""

# torchdata's StatefulDataLoader state layout (torchdata.stateful_dataloader, 0.8 to 0.11)
_SNAPSHOT = "_snapshot"
_WORKER_SNAPSHOTS = "_worker_snapshots"
_STEPS_SINCE_SNAPSHOT = "_steps_since_snapshot"
_DATASET_STATE = "dataset_state"
_NUM_YIELDED = "_num_yielded"


@dataclass(frozen=True)
class StreamState:
    """A consumer's progress in an epoch (see the module docstring for the meaning of each field)."""

    epoch: int
    seed: int
    shuffle: bool
    samples: int
    """Positions of the epoch's global order (its size)."""
    batch_size: int
    global_start: int
    shard_index: int
    shard_count: int
    worker_index: int
    worker_count: int
    batches: int

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> StreamState:
        """The state of a dict made by :meth:`to_dict`; ValueError names what is missing or wrong."""
        if state.get("format") != FORMAT:
            raise ValueError(f"not a patchwire stream state (its format is {state.get('format')!r}, not {FORMAT!r})")
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name not in state:
                raise ValueError(f"stream state: {name!r} is missing")
            value = state[name]
            if name == "shuffle":
                if not isinstance(value, bool):
                    raise ValueError(f"stream state: shuffle must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"stream state: {name} must be a non-negative integer, got {value!r}")
            values[name] = value
        out = cls(**values)
        if out.batch_size < 1 or not 0 <= out.shard_index < out.shard_count:
            raise ValueError(f"stream state: inconsistent batch size or shard ({out})")
        if not 0 <= out.worker_index < out.worker_count or out.global_start > out.samples:
            raise ValueError(f"stream state: inconsistent worker or global start ({out})")
        return out

    @property
    def consumed(self) -> int:
        """Positions of the global order consumed by all ranks together (a rank-level state only), at most the
        epoch's size (a rank that consumed padding consumed the whole epoch)."""
        if self.worker_count != 1:
            raise ValueError("a single DataLoader worker's state does not say what its rank consumed")
        return min(self.samples, self.global_start + self.batches * self.batch_size * self.shard_count)


def states_in(state: Mapping[str, Any]) -> tuple[list[StreamState], int]:
    """The stream states inside ``state`` and the batches its loader yielded after them: a stream state itself, or a
    torchdata ``StatefulDataLoader.state_dict()`` (one state without workers, one per worker with them, taken at
    the loader's last snapshot, plus the steps it yielded since)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a stream or loader state is a dict, got {type(state).__name__}")
    if "format" in state:
        return [StreamState.from_dict(state)], 0
    if _SNAPSHOT in state:  # StatefulDataLoader with workers
        workers = state[_SNAPSHOT].get(_WORKER_SNAPSHOTS, {})
        found = []
        for key in sorted(workers, key=lambda k: int(str(k).rsplit("_", 1)[-1])):
            dataset_state = (workers[key] or {}).get(_DATASET_STATE)
            if dataset_state is None:
                raise ValueError(f"the loader state's {key} holds no stream state (was the dataset a stream?)")
            found.append(StreamState.from_dict(dataset_state))
        if not found:
            raise ValueError("the loader state has no worker snapshots")
        return found, int(state.get(_STEPS_SINCE_SNAPSHOT, 0))
    if _NUM_YIELDED in state:  # StatefulDataLoader without workers
        dataset_state = state.get(_DATASET_STATE)
        if dataset_state is None:
            raise ValueError("the loader state holds no stream state (was the dataset a stream?)")
        return [StreamState.from_dict(dataset_state)], 0
    raise ValueError(
        "not a stream state (PytorchStreamingDataset.state_dict()) or a torchdata StatefulDataLoader.state_dict(): "
        f"its keys are {sorted(map(str, state))[:8]}"
    )


def rank_state(states: Sequence[StreamState], extra_batches: int = 0) -> StreamState:
    """One rank's state from the states of all its DataLoader workers (or its own), plus ``extra_batches`` the loader
    yielded after they were taken."""
    first = states[0]
    if len(states) == 1 and first.worker_count == 1:
        return replace(first, batches=first.batches + extra_batches)
    if first.worker_count != len(states):
        raise ValueError(
            f"a state of {len(states)} of a rank's {first.worker_count} DataLoader workers does not say what the rank "
            "consumed: give the loader's whole state (StatefulDataLoader.state_dict())"
        )
    common = replace(first, worker_index=0, worker_count=1, batches=0)
    for i, s in enumerate(states):
        if s.worker_index != i or replace(s, worker_index=0, worker_count=1, batches=0) != common:
            raise ValueError(f"the workers' states do not belong to one rank's iteration: {states[0]} and {s}")
    return replace(common, batches=sum(s.batches for s in states) + extra_batches)


def rank_batches(
    samples: int, global_start: int, shard_index: int, shard_count: int, balance: str, batch_size: int, drop_last: bool
) -> int:
    """Batches shard ``shard_index`` of ``shard_count`` has in an epoch of ``samples`` positions whose first
    ``global_start`` were consumed (the arithmetic of ``service/_epoch_order.consumer_share``)."""
    n = shard_samples(samples, global_start, shard_index, shard_count, balance)
    return n // batch_size if drop_last else math.ceil(n / batch_size)
