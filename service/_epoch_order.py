"""An epoch's order and one consumer's share of it, for StreamBatches.

The **global order** of an epoch is a function of the request's (seed, epoch) and the datasource alone:

- the population: every sample, or ``sample_subset`` (each index at most once, in the order given);
- with ``sample_weights``: ``samples_per_epoch`` draws from the population with replacement, in proportion to the
  weights (torch's ``WeightedRandomSampler``); otherwise, with ``shuffle``, a permutation of it (without a subset,
  exactly the permutation patchwire has always used, so earlier orders do not change);
- with ``subjects_per_window`` n: the subjects are permuted, and the samples of each n consecutive subjects come
  together, permuted among themselves (TorchIO's ``Queue``: a stream holds about n subjects' data at a time).

A consumer's share: the first ``global_start`` positions are skipped (an elastic resume: whoever consumed them, in
whatever number), the rest is split into ``shard_count`` interleaved shards (``shard_balance`` evens them out by
repeating the first positions or dropping the last ones, as torch's ``DistributedSampler`` does), the shard into
batches (``drop_last`` drops a short final one), the batches among ``batch_shard_count`` consumers (DataLoader
workers) round robin, and finally ``start_position`` samples of the consumer's own sequence are skipped.

Every sample keeps its **position** in the global order (padding repeats get positions past its end), which seeds
its random transforms: an epoch is the same whatever the number of ranks and workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from patchwire.service._errors import InvalidArgument, OutOfRange, bounded_list
from patchwire.service._limits import Limits, exhausted
from patchwire.v1 import dataset_service_pb2

__all__ = ["Share", "consumer_share", "global_order"]

_PAD = dataset_service_pb2.SHARD_BALANCE_PAD
_DROP = dataset_service_pb2.SHARD_BALANCE_DROP


def global_order(
    request: dataset_service_pb2.StreamBatchesRequest,
    length: int,
    subject_starts: Sequence[int],
    limits: Limits | None = None,
) -> np.ndarray | range:
    """The epoch's sample indices in order (a ``range`` when nothing is reordered: nothing materialised).
    ``subject_starts``: the first sample index of each subject, ascending (for subject windows); ``limits``
    (``max_epoch_samples``) bound what the request names or draws."""
    limit = (limits if limits is not None else Limits()).max_epoch_samples
    for name in ("sample_subset", "sample_weights"):
        if len(getattr(request, name)) > limit:
            raise exhausted(f"{name}: {len(getattr(request, name))} values", limit, "--max-epoch-samples")
    subset = _subset(request.sample_subset, length) if len(request.sample_subset) else None
    population = subset if subset is not None else range(length)
    n = len(population)
    if len(request.sample_weights):
        order: np.ndarray | range = _weighted(request, population, limit)
    elif not request.shuffle:
        order = population
    elif subset is None:
        order = np.random.default_rng([int(request.seed), int(request.epoch)]).permutation(length)
    else:
        order = subset[np.random.default_rng([int(request.seed), int(request.epoch)]).permutation(n)]
    if request.subjects_per_window < 0:
        raise InvalidArgument(f"subjects_per_window: must not be negative, got {request.subjects_per_window}")
    if request.subjects_per_window and (request.shuffle or len(request.sample_weights)) and len(order):
        order = _windowed(np.asarray(order), request, subject_starts)
    return order


def _subset(values: Sequence[int], length: int) -> np.ndarray:
    subset = np.asarray(values, dtype=np.int64)
    bad = (subset < 0) | (subset >= length)
    if bad.any():
        raise OutOfRange(
            f"sample_subset: indices {bounded_list(subset[bad][:8].tolist(), quote=False)} are out of range for a "
            f"datasource of {length} samples"
        )
    if len(np.unique(subset)) != len(subset):
        raise InvalidArgument("sample_subset: an index appears more than once (give weights to repeat samples)")
    return subset


def _weighted(
    request: dataset_service_pb2.StreamBatchesRequest, population: np.ndarray | range, limit: int
) -> np.ndarray:
    weights = np.asarray(request.sample_weights, dtype=np.float64)
    n = len(population)
    if len(weights) != n:
        raise InvalidArgument(
            f"sample_weights: {len(weights)} weights given for a population of {n} samples (one per sample of "
            "sample_subset, or of the datasource without one)"
        )
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise InvalidArgument("sample_weights: weights must be finite and non-negative, with a positive sum")
    draws = int(request.samples_per_epoch) or n
    if draws < 0:
        raise InvalidArgument(f"samples_per_epoch: must not be negative, got {request.samples_per_epoch}")
    if draws > max(n, limit):
        raise exhausted(f"samples_per_epoch: {draws} draws", max(n, limit), "--max-epoch-samples")
    rng = np.random.default_rng([int(request.seed), int(request.epoch), 1])
    picks = rng.choice(n, size=draws, replace=True, p=weights / weights.sum())
    return np.asarray(population)[picks] if isinstance(population, np.ndarray) else picks.astype(np.int64)


def _windowed(
    order: np.ndarray, request: dataset_service_pb2.StreamBatchesRequest, subject_starts: Sequence[int]
) -> np.ndarray:
    """``order`` regrouped so that the samples of each ``subjects_per_window`` consecutive subjects (in a random
    subject order) come together, in random order within their window."""
    rng = np.random.default_rng([int(request.seed), int(request.epoch), 2])
    subjects = np.searchsorted(np.asarray(subject_starts, dtype=np.int64), order, side="right") - 1
    rank = np.empty(len(subject_starts), dtype=np.int64)
    rank[rng.permutation(len(subject_starts))] = np.arange(len(subject_starts))
    window = rank[subjects] // int(request.subjects_per_window)
    return order[np.lexsort((rng.random(len(order)), window))]


@dataclass(frozen=True)
class Share:
    """One consumer's samples: ``positions`` into the global order (positions past its end are padding repeats) and
    ``first``, the consumer's own position of the first of them. Ranges stay ranges (nothing materialised)."""

    positions: np.ndarray | range
    first: int

    def indices(self, order: np.ndarray | range, start: int) -> np.ndarray | range:
        """The sample indices at ``positions`` of ``order`` (whose first ``start`` positions were skipped: padding
        repeats the positions from ``start`` on)."""
        n = len(order) - start
        p = self.positions
        if not len(p):
            return range(0)
        if isinstance(p, range) and p[-1] < len(order):  # no padding: a slice of the order
            return order[p.start : p.stop : p.step]
        wrapped = start + (np.asarray(p, dtype=np.int64) - start) % n
        if isinstance(order, range):
            return order.start + wrapped * order.step
        return np.asarray(order[wrapped], dtype=np.int64)


def consumer_share(request: dataset_service_pb2.StreamBatchesRequest, total: int) -> Share:
    """The global positions this consumer streams, in order, for an epoch of ``total`` samples."""
    shard_count = request.shard_count or 1
    batch_count = request.batch_shard_count or 1
    if not 0 <= request.global_start <= total:
        raise OutOfRange(f"global_start: {request.global_start} must be in [0, {total}] (the epoch's samples)")
    if batch_count < 0 or not 0 <= request.batch_shard_index < batch_count:
        raise InvalidArgument(
            f"batch_shard_index: {request.batch_shard_index} must be in [0, batch_shard_count={batch_count})"
        )
    if request.shard_balance not in (dataset_service_pb2.SHARD_BALANCE_UNSPECIFIED, _PAD, _DROP):
        raise InvalidArgument(f"shard_balance: unknown value {request.shard_balance}")
    rest = total - request.global_start
    if request.shard_balance == _PAD and rest:
        rest = math.ceil(rest / shard_count) * shard_count
    elif request.shard_balance == _DROP:
        rest = rest // shard_count * shard_count
    positions: np.ndarray | range = range(
        request.global_start + request.shard_index, request.global_start + rest, shard_count
    )
    if request.drop_last:
        positions = positions[: len(positions) - len(positions) % request.batch_size]
    if batch_count > 1:
        batch_of = np.arange(len(positions)) // request.batch_size
        positions = np.asarray(positions, dtype=np.int64)[batch_of % batch_count == request.batch_shard_index]
    return Share(positions[request.start_position :], int(request.start_position))
