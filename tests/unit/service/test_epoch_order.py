"""An epoch's global order and the consumers' shares of it (service/_epoch_order.py)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchwire.service._epoch_order import consumer_share, global_order
from patchwire.service._errors import InvalidArgument, OutOfRange, ResourceExhausted
from patchwire.service._limits import Limits
from patchwire.v1 import dataset_service_pb2 as dpb

PAD, DROP, NONE = dpb.SHARD_BALANCE_PAD, dpb.SHARD_BALANCE_DROP, dpb.SHARD_BALANCE_UNSPECIFIED
STARTS = [0, 10, 25, 40]  # 4 subjects of 10, 15, 15, 20 samples
LENGTH = 60


def request(**fields: object) -> dpb.StreamBatchesRequest:
    return dpb.StreamBatchesRequest(batch_size=fields.pop("batch_size", 4), **fields)  # type: ignore[arg-type]


def share_of(req: dpb.StreamBatchesRequest, order: np.ndarray | range) -> list[int]:
    share = consumer_share(req, len(order))
    return [int(i) for i in share.indices(order, req.global_start)]


def test_plain_shuffle_keeps_the_historic_permutation() -> None:
    order = global_order(request(shuffle=True, seed=3, epoch=2), LENGTH, STARTS)
    np.testing.assert_array_equal(order, np.random.default_rng([3, 2]).permutation(LENGTH))
    assert global_order(request(), LENGTH, STARTS) == range(LENGTH)


@settings(max_examples=60, deadline=None)
@given(
    shards=st.integers(1, 5),
    workers=st.integers(1, 4),
    batch=st.integers(1, 7),
    start=st.integers(0, LENGTH),
    balance=st.sampled_from([NONE, PAD, DROP]),
)
def test_shards_and_workers_cover_the_rest_of_the_epoch(
    shards: int, workers: int, batch: int, start: int, balance: int
) -> None:
    order = global_order(request(shuffle=True, seed=1), LENGTH, STARTS)
    rest = [int(i) for i in order[start:]]
    got: collections.Counter[int] = collections.Counter()
    sizes = []
    for r in range(shards):
        rank: list[int] = []
        for w in range(workers):
            req = request(
                batch_size=batch,
                shard_index=r,
                shard_count=shards,
                shard_balance=balance,
                global_start=start,
                batch_shard_index=w,
                batch_shard_count=workers,
            )
            rank += share_of(req, order)
        sizes.append(len(rank))
        got.update(rank)
    if balance == NONE:
        assert got == collections.Counter(rest)
        assert max(sizes) - min(sizes) <= 1
    else:
        assert len(set(sizes)) == 1  # every rank the same number of samples
        if balance == PAD:
            assert set(got) == set(rest) and sum(sizes) == -(-len(rest) // shards) * shards
        else:
            assert sum(sizes) == len(rest) // shards * shards and all(got[i] == 1 for i in got)


def test_workers_take_the_ranks_batches_round_robin() -> None:
    order = range(20)
    whole = share_of(request(batch_size=3), order)
    parts = [share_of(request(batch_size=3, batch_shard_index=w, batch_shard_count=2), order) for w in range(2)]
    batches = [whole[i : i + 3] for i in range(0, len(whole), 3)]
    assert parts[0] == [i for b in batches[0::2] for i in b] and parts[1] == [i for b in batches[1::2] for i in b]


def test_padding_repeats_the_first_positions_with_positions_of_their_own() -> None:
    req = request(batch_size=1, shard_index=1, shard_count=4, shard_balance=PAD)
    share = consumer_share(req, 5)
    assert list(share.positions) == [1, 5]  # position 5 is past the end: a repeat of position 0
    assert list(share.indices(range(10, 15), 0)) == [11, 10]


def test_subject_windows_group_subjects() -> None:
    order = np.asarray(global_order(request(shuffle=True, seed=5, subjects_per_window=2), LENGTH, STARTS))
    assert sorted(order.tolist()) == list(range(LENGTH))
    subjects = (np.searchsorted(STARTS, order, side="right") - 1).tolist()
    left = collections.Counter(subjects)
    window: set[int] = set()
    for s in subjects:  # the order is a run of windows, each holding every sample of at most 2 subjects
        window.add(s)
        assert len(window) <= 2, window
        left[s] -= 1
        if all(left[w] == 0 for w in window) and len(window) == 2:
            window = set()
    assert subjects[:10] != sorted(subjects[:10])  # samples are mixed within a window


def test_weights_draw_in_proportion() -> None:
    weights = [0.0] * 50 + [1.0] * 5 + [3.0] * 5
    req = request(sample_weights=weights, samples_per_epoch=40_000, seed=2)
    counts = np.bincount(np.asarray(global_order(req, LENGTH, STARTS)), minlength=LENGTH)
    assert counts[:50].sum() == 0
    assert abs(counts[55:].sum() / 40_000 - 0.75) < 0.01


def test_subset_is_the_population() -> None:
    req = request(sample_subset=[5, 3, 9], shuffle=True, seed=1)
    assert sorted(np.asarray(global_order(req, LENGTH, STARTS)).tolist()) == [3, 5, 9]
    assert list(global_order(request(sample_subset=[5, 3, 9]), LENGTH, STARTS)) == [5, 3, 9]


@pytest.mark.parametrize(
    ("fields", "error", "text"),
    [
        ({"sample_subset": [1, 1]}, InvalidArgument, "more than once"),
        ({"sample_subset": [60]}, OutOfRange, "out of range"),
        ({"sample_weights": [1.0]}, InvalidArgument, "1 weights given"),
        ({"sample_weights": [-1.0] * LENGTH}, InvalidArgument, "non-negative"),
        ({"sample_weights": [1.0] * LENGTH, "samples_per_epoch": 1 << 30}, ResourceExhausted, "max-epoch-samples"),
        ({"subjects_per_window": -1, "shuffle": True}, InvalidArgument, "subjects_per_window"),
    ],
)
def test_bad_orders_are_refused(fields: dict[str, object], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        global_order(request(**fields), LENGTH, STARTS)


def test_long_subsets_and_weights_are_bounded() -> None:
    limits = Limits(max_epoch_samples=10)
    with pytest.raises(ResourceExhausted, match=r"sample_subset: 11 values.*--max-epoch-samples"):
        global_order(request(sample_subset=list(range(11))), LENGTH, STARTS, limits)
    with pytest.raises(ResourceExhausted, match="sample_weights: 60 values"):
        global_order(request(sample_weights=[1.0] * LENGTH), LENGTH, STARTS, limits)
    draws = request(sample_weights=[1.0] * 5, sample_subset=[0, 1, 2, 3, 4], samples_per_epoch=10)
    assert len(global_order(draws, LENGTH, STARTS, limits)) == 10


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"global_start": 61}, "global_start"),
        ({"batch_shard_index": 2, "batch_shard_count": 2}, "batch_shard_index"),
        ({"shard_balance": 7}, "shard_balance"),
    ],
)
def test_bad_shares_are_refused(fields: dict[str, object], text: str) -> None:
    with pytest.raises((InvalidArgument, OutOfRange), match=text):
        consumer_share(request(**fields), LENGTH)
