"""Stream states: the dict form round-trips and is validated, torchdata's loader states are read, the states of one
rank's workers combine into the rank's, and a rank's state is a global cursor (checked against the server's own
share arithmetic, which decides what a resumed stream sends)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from patchwire.client._epochs import EpochOptions, epoch_size
from patchwire.client._stream_state import FORMAT, StreamState, rank_batches, rank_state, states_in
from patchwire.service._epoch_order import consumer_share
from patchwire.v1 import dataset_service_pb2

BASE = StreamState(
    epoch=3,
    seed=7,
    shuffle=True,
    samples=60,
    batch_size=4,
    global_start=0,
    shard_index=0,
    shard_count=2,
    worker_index=0,
    worker_count=2,
    batches=0,
)


def test_a_state_round_trips_and_bad_ones_are_refused() -> None:
    state = replace(BASE, batches=5)
    assert StreamState.from_dict(state.to_dict()) == state and state.to_dict()["format"] == FORMAT
    for broken, match in [
        ({**state.to_dict(), "format": "other/1"}, "not a patchwire stream state"),
        ({k: v for k, v in state.to_dict().items() if k != "seed"}, "'seed' is missing"),
        ({**state.to_dict(), "batches": -1}, "batches must be a non-negative integer"),
        ({**state.to_dict(), "shuffle": 1}, "shuffle must be a bool"),
        ({**state.to_dict(), "shard_index": 2}, "inconsistent batch size or shard"),
        ({**state.to_dict(), "global_start": 61}, "inconsistent worker or global start"),
    ]:
        with pytest.raises(ValueError, match=match):
            StreamState.from_dict(broken)


def test_torchdata_loader_states_are_read() -> None:
    one = replace(BASE, worker_count=1, batches=4).to_dict()
    single = {"_num_yielded": 4, "dataset_state": one, "fetcher_state": {}}
    assert states_in(single) == ([StreamState.from_dict(one)], 0)
    workers = {
        f"worker_{i}": {"worker_id": i, "dataset_state": replace(BASE, worker_index=i, batches=2).to_dict()}
        for i in (1, 0)
    }
    found, extra = states_in({"_snapshot": {"_worker_snapshots": workers}, "_steps_since_snapshot": 1})
    assert [s.worker_index for s in found] == [0, 1] and extra == 1
    with pytest.raises(ValueError, match="not a stream state"):
        states_in({"epoch": 3})
    with pytest.raises(ValueError, match="holds no stream state"):
        states_in({"_snapshot": {"_worker_snapshots": {"worker_0": {"dataset_state": None}}}})


def test_workers_states_combine_into_the_ranks() -> None:
    workers = [replace(BASE, worker_index=0, batches=3), replace(BASE, worker_index=1, batches=2)]
    rank = rank_state(workers, extra_batches=1)
    assert (rank.worker_count, rank.batches) == (1, 6)
    assert rank.consumed == 6 * 4 * 2  # six batches of four on each of two ranks
    with pytest.raises(ValueError, match="1 of a rank's 2 DataLoader workers"):
        rank_state(workers[:1])
    with pytest.raises(ValueError, match="one rank's iteration"):
        rank_state([workers[0], replace(workers[1], epoch=4)])
    with pytest.raises(ValueError, match="does not say what its rank consumed"):
        _ = workers[0].consumed
    assert replace(rank, batches=100).consumed == 60  # padding consumed: the whole epoch


@pytest.mark.parametrize("balance", ["none", "pad", "drop"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_ranks_cursor_is_where_the_server_continues(balance: str, world: int) -> None:
    """After every rank consumed k batches, a resumed stream with any world size starts at the first position no
    rank consumed, and all ranks together get each remaining position once (padding aside)."""
    samples, batch = 59, 4
    balances = {"none": 0, "pad": 1, "drop": 2}
    for k in range(0, 8):
        rank = replace(BASE, samples=samples, batch_size=batch, shard_count=world, worker_count=1, batches=k)
        consumed = rank.consumed
        before = set()
        for r in range(world):
            request = dataset_service_pb2.StreamBatchesRequest(
                batch_size=batch, shard_index=r, shard_count=world, shard_balance=balances[balance]
            )
            before.update(p for p in consumer_share(request, samples).positions[: k * batch] if p < samples)
        if consumed < samples:
            assert before == set(range(consumed))
        for new_world in (1, 2):
            after: list[int] = []
            for r in range(new_world):
                request = dataset_service_pb2.StreamBatchesRequest(
                    batch_size=batch, shard_index=r, shard_count=new_world, global_start=consumed
                )
                after.extend(consumer_share(request, samples).positions)
            assert sorted(after) == list(range(consumed, samples))


def test_epoch_size_and_rank_batches() -> None:
    assert epoch_size(60, None) == 60
    assert epoch_size(60, EpochOptions(sample_subset=[1, 2, 3])) == 3
    assert epoch_size(60, EpochOptions(sample_weights=[1.0] * 60, samples_per_epoch=100)) == 100
    assert epoch_size(60, EpochOptions(sample_subset=[1, 2], sample_weights=[1.0, 2.0])) == 2
    assert [rank_batches(59, 0, r, 2, "pad", 4, False) for r in (0, 1)] == [8, 8]
    assert [rank_batches(59, 0, r, 2, "drop", 4, True) for r in (0, 1)] == [7, 7]
    assert [rank_batches(59, 0, r, 2, "none", 4, False) for r in (0, 1)] == [8, 8]
    assert [rank_batches(57, 0, r, 2, "none", 4, False) for r in (0, 1)] == [8, 7]
    assert rank_batches(59, 24, 0, 1, "pad", 4, False) == 9
