"""get_tf_dataset's cardinality: the client's count of a consumer's elements equals what the server's epoch
arithmetic (service/_epoch_order.py) streams, for every combination of epoch options, shards and batching."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tensorflow")

from patchwire.client._epochs import EpochOptions
from patchwire.client.tensorflow import _share_length
from patchwire.service._epoch_order import consumer_share, global_order
from patchwire.v1 import dataset_service_pb2 as dpb

STARTS = [0, 10, 25, 40]  # 4 subjects of 10, 15, 15, 20 samples
LENGTH = 60


class _Sized:
    """Stands for a datasource: the count needs only its length."""

    def __len__(self) -> int:
        return LENGTH


@st.composite
def _epochs(draw: Any) -> EpochOptions:
    subset = draw(st.none() | st.lists(st.integers(0, LENGTH - 1), unique=True, max_size=LENGTH))
    population = len(subset) if subset else LENGTH
    weights = draw(st.none() | st.just([1.0] * population))
    draws = draw(st.integers(0, 90)) if weights else 0
    total = (draws or population) if weights else population
    return EpochOptions(
        sample_subset=subset,
        sample_weights=weights,
        samples_per_epoch=draws,
        subjects_per_window=draw(st.integers(0, 3)),
        shard_balance=draw(st.sampled_from(["none", "pad", "drop"])),
        global_start=draw(st.integers(0, total)),
        batch_shard=draw(st.integers(1, 3).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n)))),
    )


@settings(max_examples=200, deadline=None)
@given(
    options=_epochs(),
    shards=st.integers(1, 4).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
)
def test_count_equals_the_servers_batches(
    options: EpochOptions, shards: tuple[int, int], batch_size: int, drop_last: bool
) -> None:
    request = dpb.StreamBatchesRequest(
        batch_size=batch_size, shuffle=True, seed=5, shard_index=shards[0], shard_count=shards[1], drop_last=drop_last
    )
    options.fill(request)
    share = consumer_share(request, len(global_order(request, LENGTH, STARTS)))
    batches = math.ceil(len(share.positions) / batch_size)  # only the epoch's last batch can be short
    assert _share_length(_Sized(), batch_size, shards[0], shards[1], drop_last, options) == batches  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(options=_epochs(), shards=st.integers(1, 4).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))))
def test_unbatched_count_equals_the_servers_samples(options: EpochOptions, shards: tuple[int, int]) -> None:
    options = dataclasses.replace(options, batch_shard=(0, 1))  # batch shards need batches
    request = dpb.StreamBatchesRequest(
        batch_size=64, shuffle=True, seed=5, shard_index=shards[0], shard_count=shards[1]
    )
    options.fill(request)
    share = consumer_share(request, len(global_order(request, LENGTH, STARTS)))
    assert _share_length(_Sized(), None, shards[0], shards[1], False, options) == len(share.positions)  # type: ignore[arg-type]
