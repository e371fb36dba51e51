"""What an epoch of the server's stream covers beyond (shuffle, seed, epoch), and how it is shared.

See ``service/_epoch_order.py`` (StreamBatchesRequest) for the exact semantics: the epoch's global order depends on
(seed, epoch) and these options only; its consumers (ranks, DataLoader workers) change who gets a sample, never
the order or a sample's randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from patchwire.v1 import dataset_service_pb2

__all__ = ["BALANCES", "EpochOptions", "epoch_size", "shard_samples"]

BALANCES = {
    "none": dataset_service_pb2.SHARD_BALANCE_UNSPECIFIED,
    "pad": dataset_service_pb2.SHARD_BALANCE_PAD,
    "drop": dataset_service_pb2.SHARD_BALANCE_DROP,
}
"""``shard_balance`` names: shards differ by at most one sample, or are evened out by repeating the first samples
(torch's DistributedSampler) or by dropping the last ones."""


@dataclass(frozen=True)
class EpochOptions:
    """Options of a streamed epoch (all optional)."""

    sample_subset: Sequence[int] | None = None
    """Only these sample indices (each at most once), e.g. from ``select_indices``."""
    sample_weights: Sequence[float] | None = None
    """One weight per sample of the population (the subset, or every sample): the epoch draws with replacement in
    proportion to them (torch's WeightedRandomSampler)."""
    samples_per_epoch: int = 0
    """With weights: draws per epoch (0: the population's size)."""
    subjects_per_window: int = 0
    """With shuffling: the samples of this many subjects at a time come together (TorchIO's Queue), 0: one
    permutation of everything."""
    shard_balance: str = "none"
    """"none", "pad" or "drop" (:data:`BALANCES`)."""
    global_start: int = 0
    """Positions of the epoch's order already consumed (by any number of consumers): an elastic resume."""
    batch_shard: tuple[int, int] = field(default=(0, 1))
    """(index, count): this consumer takes every count-th batch of its shard, from the index-th."""

    def __post_init__(self) -> None:
        if self.shard_balance not in BALANCES:
            raise ValueError(f"shard_balance must be one of {sorted(BALANCES)}, got {self.shard_balance!r}")
        index, count = self.batch_shard
        if not 0 <= index < count:
            raise ValueError(f"batch_shard index {index} must be in [0, count={count})")
        if self.global_start < 0:
            raise ValueError(f"global_start must not be negative, got {self.global_start}")

    def fill(self, request: dataset_service_pb2.StreamBatchesRequest) -> None:
        """Sets these options' fields of ``request``."""
        if self.sample_subset is not None:
            request.sample_subset.extend(np.asarray(self.sample_subset, dtype=np.int64).tolist())
        if self.sample_weights is not None:
            request.sample_weights.extend(np.asarray(self.sample_weights, dtype=np.float64).tolist())
        request.samples_per_epoch = self.samples_per_epoch
        request.subjects_per_window = self.subjects_per_window
        request.shard_balance = BALANCES[self.shard_balance]
        request.global_start = self.global_start
        request.batch_shard_index, request.batch_shard_count = self.batch_shard


def epoch_size(length: int, options: EpochOptions | None) -> int:
    """Positions of an epoch's global order for a datasource of ``length`` samples: the draws with weights, the
    subset, or every sample."""
    if options is not None and options.sample_weights is not None and len(options.sample_weights):
        return options.samples_per_epoch or len(options.sample_weights)
    if options is not None and options.sample_subset is not None and len(options.sample_subset):
        return len(options.sample_subset)
    return length


def shard_samples(samples: int, global_start: int, shard_index: int, shard_count: int, balance: str) -> int:
    """Samples shard ``shard_index`` of ``shard_count`` streams of an epoch of ``samples`` positions whose first
    ``global_start`` were consumed: the arithmetic of the server's ``consumer_share`` (``service/_epoch_order.py``)
    before batches are formed."""
    rest = samples - global_start
    if balance == "pad" and rest:
        rest = math.ceil(rest / shard_count) * shard_count
    elif balance == "drop":
        rest = rest // shard_count * shard_count
    return len(range(shard_index, rest, shard_count))
