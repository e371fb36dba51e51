"""TensorFlow adapters (``pymia.data.backends.tensorflow``).

``get_tf_generator(ds)`` is pymia's: a generator function yielding ``ds[i]`` in order, for
``tf.data.Dataset.from_generator``; here it reads the server's stream instead of one call per sample (one epoch,
the same every time it is called).

:func:`get_tf_dataset` builds a ``tf.data.Dataset`` for training, with a correct ``output_signature`` (inferred by
:func:`infer_output_signature`) and an exact cardinality, so ``len(dataset)`` works and Keras knows the steps of an
epoch::

    dataset = get_tf_dataset(ds, batch_size=16, shuffle=True, seed=0)
    model.fit(dataset.map(lambda b: (b[defs.KEY_IMAGES], b[defs.KEY_LABELS])), epochs=10)

**Epochs.** Every iteration of the dataset streams an epoch whose order (and whose samples' randomness: random
patches and transforms) the server derives from (``seed``, epoch): each ``model.fit`` epoch sees a new shuffle.
The epoch comes from an :class:`EpochCounter`, read when an iteration asks for its first element (Keras makes an
iterator before it needs one: that streams nothing); an iteration that delivers its last element moves the counter
on by one, an iteration abandoned early (``take(n)``, a look at the first batch) does not. So ``fit(epochs=n)``
streams epochs ``epoch`` to ``epoch + n - 1``, with or without a ``prefetch`` after the dataset. Pass a counter of
your own as ``epoch`` to set it explicitly (``counter.set_epoch(e)`` before an iteration), or add
``counter.keras_callback()`` to ``fit``'s callbacks to stream Keras's own epoch number (``initial_epoch``
included) whatever else iterates the dataset (an evaluation of it also moves the counter on).

**Distribution.** With ``input_context`` (``strategy.distribute_datasets_from_function(lambda ctx:
get_tf_dataset(ds, batch_size=GLOBAL, input_context=ctx, ...))``) the pipeline ``input_pipeline_id`` of
``num_input_pipelines`` streams every ``num_input_pipelines``-th sample of the epoch's one global order, in
batches of ``ctx.get_per_replica_batch_size(GLOBAL)``; the shards are evened out (``EpochOptions.shard_balance``:
"pad" by default, repeating the epoch's first samples as torch's DistributedSampler does, or "drop"), so every
pipeline has as many batches (a given ``epoch_options`` keeps its own balance, and pipelines that would get
different batch counts are refused: a strategy needs as many steps from each). ``epoch_options``
(:class:`patchwire.client._epochs.EpochOptions`) adds subsets, weighted draws, subject windows, an elastic
``global_start`` and ``batch_shard`` (this reader takes every count-th batch of its shard); the cardinality
accounts for all of them.

Both functions read the datasource's stream, so ``datasource.stats`` counts their samples;
``datasource.stats.timed(dataset)`` times what the training loop waits for.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from patchwire.client._datasource import PREFETCH_MESSAGES, RemoteDatasource
from patchwire.client._epochs import EpochOptions, epoch_size, shard_samples

__all__ = ["EpochCounter", "get_tf_dataset", "get_tf_generator", "infer_output_signature"]


def get_tf_generator(
    datasource: RemoteDatasource,
    keys: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> Callable[[], Iterator[dict[str, Any]]]:
    """A generator function yielding the datasource's samples (only ``keys``, if given), streamed in order
    (or in the shuffled order of (``seed``, ``epoch``))."""

    def generator() -> Iterator[dict[str, Any]]:
        for sample in datasource.samples(shuffle=shuffle, seed=seed, epoch=epoch):
            yield sample if keys is None else {k: sample[k] for k in keys}

    return generator


def _spec(value: Any) -> tf.TensorSpec | None:
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype == np.float16:
            return tf.TensorSpec(shape=np.shape(value), dtype=tf.float16)
        return tf.TensorSpec(shape=np.shape(value), dtype=tf.as_dtype(value.dtype))
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return tf.TensorSpec(shape=(), dtype=tf.int64)
    if isinstance(value, float):
        return tf.TensorSpec(shape=(), dtype=tf.float64)
    if isinstance(value, str):
        return tf.TensorSpec(shape=(), dtype=tf.string)
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return tf.TensorSpec(shape=(len(value),), dtype=tf.int64)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tf.TensorSpec(shape=(len(value),), dtype=tf.string)
    return None


def _merge(a: tf.TensorSpec, b: tf.TensorSpec, key: str) -> tf.TensorSpec:
    if a.dtype != b.dtype:
        raise ValueError(f"entry {key!r} changes dtype between samples ({a.dtype.name} vs {b.dtype.name})")
    if a.shape.rank != b.shape.rank:
        return tf.TensorSpec(shape=None, dtype=a.dtype)
    dims = [x if x == y else None for x, y in zip(a.shape.as_list(), b.shape.as_list(), strict=True)]
    return tf.TensorSpec(shape=dims, dtype=a.dtype)


def infer_output_signature(datasource: RemoteDatasource, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Signature of the datasource's samples, from the first and last sample of every subject: dimensions that
    differ among those (subjects of different shape, incomplete border patches, several slice axes) become None.
    Entries TensorFlow cannot hold (image properties, index expressions) are left out unless named in ``keys``."""
    probes = sorted(
        {
            i
            for s in datasource.subjects
            if s.sample_count
            for i in (s.first_sample_index, s.first_sample_index + s.sample_count - 1)
        }
    )
    if not probes:
        raise ValueError("the datasource has no samples to infer a signature from")
    signature: dict[str, Any] = {}
    for sample in datasource.get_samples(probes):
        for key in keys if keys is not None else sample:
            spec = _spec(sample[key])
            if spec is None:
                if keys is not None:
                    raise ValueError(f"entry {key!r} ({type(sample[key]).__name__}) cannot be a TensorFlow tensor")
                continue
            signature[key] = spec if key not in signature else _merge(signature[key], spec, key)
    return signature


class EpochCounter:
    """The epoch the next iteration of a :func:`get_tf_dataset` dataset streams (shareable among datasets, e.g. the
    input pipelines of one strategy). An iteration that delivers its last element moves it on by one."""

    def __init__(self, epoch: int = 0) -> None:
        self._lock = threading.Lock()
        self._epoch = _epoch_number(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration streams."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration stream ``epoch``."""
        epoch = _epoch_number(epoch)
        with self._lock:
            self._epoch = epoch

    def _completed(self, epoch: int) -> None:
        """An iteration of ``epoch`` delivered its last element: the next streams ``epoch + 1``, unless the epoch was
        set (or moved on by another iteration) meanwhile."""
        with self._lock:
            if self._epoch == epoch:
                self._epoch = epoch + 1

    def keras_callback(self) -> Any:
        """A ``keras.callbacks.Callback`` that sets this counter to Keras's epoch number at the start of each epoch
        (before Keras iterates the dataset), so epoch ``e`` of ``fit`` streams epoch ``e``."""
        counter = self

        class _SetEpoch(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                counter.set_epoch(epoch)

        return _SetEpoch()

    def __repr__(self) -> str:
        return f"EpochCounter(epoch={self._epoch})"


def _epoch_number(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    return int(epoch)


def _share_length(
    datasource: RemoteDatasource,
    batch_size: int | None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_last: bool = False,
    epoch_options: EpochOptions | None = None,
) -> int:
    """Elements (batches of ``batch_size``, or samples without one) that consumer ``shard_index`` of
    ``shard_count`` streams in an epoch: the arithmetic of the server's StreamBatches (``service/_epoch_order.py``)
    on the epoch's size, ``global_start``, ``shard_balance``, ``drop_last`` and ``batch_shard``."""
    options = epoch_options if epoch_options is not None else EpochOptions()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
    total = epoch_size(len(datasource), options)
    if options.global_start > total:
        raise ValueError(f"global_start {options.global_start} must be at most the epoch's {total} samples")
    samples = shard_samples(total, options.global_start, shard_index, shard_count, options.shard_balance)
    index, count = options.batch_shard
    if batch_size is None:
        if (index, count) != (0, 1):
            raise ValueError("batch_shard needs a batch_size (it shares a shard's batches among readers)")
        return samples
    if drop_last:
        samples -= samples % batch_size
    return len(range(index, math.ceil(samples / batch_size), count))


def _batched(spec: tf.TensorSpec, batch: int | None) -> tf.TensorSpec:
    return tf.TensorSpec(shape=tf.TensorShape([batch]).concatenate(spec.shape), dtype=spec.dtype)


def _column(value: Any, key: str, spec: tf.TensorSpec) -> Any:
    """A streamed batch's entry as one array (per-sample values come as lists)."""
    if isinstance(value, np.ndarray) or spec.dtype == tf.string:
        return value
    shapes = {np.shape(v) for v in value}
    if len(shapes) > 1:
        raise ValueError(
            f"entry {key!r} differs in shape within a batch ({sorted(shapes)}): a batch needs samples of one shape "
            "(use batch_size=None and tf.data's padded_batch or ragged_batch)"
        )
    return np.stack(value)


def get_tf_dataset(
    datasource: RemoteDatasource,
    keys: Sequence[str] | None = None,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int | EpochCounter = 0,
    output_signature: dict[str, Any] | None = None,
    *,
    drop_remainder: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    epoch_options: EpochOptions | None = None,
    prefetch: int = PREFETCH_MESSAGES,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of the datasource's samples (dicts of tensors, ``sample_index`` among them), in batches
    of ``batch_size`` made by the server if given (a short last one unless ``drop_remainder``), with its exact
    cardinality.

    Each iteration streams the next epoch (see the module's Epochs): ``epoch`` is the first one, or an
    :class:`EpochCounter` to set it from outside. ``shuffle`` orders an epoch by a permutation of (``seed``, epoch).
    ``input_context`` (``tf.distribute.InputContext``): this is input pipeline ``input_pipeline_id`` of
    ``num_input_pipelines``, ``batch_size`` is the global batch size and the elements are per-replica batches
    (``input_context.get_per_replica_batch_size(batch_size)``). ``epoch_options``
    (:class:`~patchwire.client._epochs.EpochOptions`, default ``EpochOptions(shard_balance="pad")``): subsets,
    weights, subject windows, shard balance, an elastic start, batch shards. ``prefetch``: messages decoded ahead
    by a background thread. The signature is inferred (see :func:`infer_output_signature`) unless given (per
    sample, without the batch dimension).
    """
    counter = epoch if isinstance(epoch, EpochCounter) else EpochCounter(epoch)
    options = epoch_options if epoch_options is not None else EpochOptions(shard_balance="pad")
    shard_index, shard_count = 0, 1
    if input_context is not None:
        shard_index, shard_count = input_context.input_pipeline_id, input_context.num_input_pipelines
        if batch_size is not None:
            batch_size = input_context.get_per_replica_batch_size(batch_size)
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_remainder and batch_size is None:
        raise ValueError("drop_remainder needs a batch_size")
    length = _share_length(datasource, batch_size, shard_index, shard_count, drop_remainder, options)
    if shard_count > 1:
        counts = {
            _share_length(datasource, batch_size, i, shard_count, drop_remainder, options) for i in range(shard_count)
        }
        if len(counts) > 1:
            raise ValueError(
                f"the {shard_count} input pipelines would stream {sorted(counts)} elements: give epoch_options a "
                "shard_balance of 'pad' or 'drop' so that each has as many"
            )
    signature = output_signature if output_signature is not None else infer_output_signature(datasource, keys)
    names = list(signature)

    def generator() -> Iterator[dict[str, Any]]:
        current = counter.epoch  # read when the iteration asks for its first element, not when it is made
        stream: Iterator[dict[str, Any]]
        if batch_size is None:
            stream = datasource.samples(
                shuffle, seed, current, shard_index, shard_count, prefetch=prefetch, epoch_options=options
            )
        else:
            stream = datasource.batches(
                batch_size,
                shuffle,
                seed,
                current,
                shard_index,
                shard_count,
                drop_remainder,
                prefetch=prefetch,
                epoch_options=options,
            )
        delivered = 0
        try:
            for element in stream:
                delivered += 1
                if delivered == length:
                    counter._completed(current)  # Keras stops asking after the last step: none follows this one
                if batch_size is None:
                    yield {k: element[k] for k in names}
                else:
                    yield {k: _column(element[k], k, signature[k]) for k in names}
        finally:
            if isinstance(stream, Generator):
                stream.close()  # an iteration abandoned early ends its stream here, not at collection
        counter._completed(current)

    element_signature = signature
    if batch_size is not None:
        element_signature = {k: _batched(s, batch_size if drop_remainder else None) for k, s in signature.items()}
    dataset = tf.data.Dataset.from_generator(generator, output_signature=element_signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(length))
