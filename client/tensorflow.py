"""TensorFlow adapters (``pymia.data.backends.tensorflow``).

``get_tf_generator(ds)`` is pymia's: a generator function yielding ``ds[i]`` in order, for
``tf.data.Dataset.from_generator``; here it reads the server's stream instead of one call per sample.
:func:`get_tf_dataset` builds the ``tf.data.Dataset`` itself with a correct ``output_signature``.
Both read the datasource's stream, so ``datasource.stats`` counts their samples; ``datasource.stats.timed(dataset)``
times what the training loop waits for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from patchwire.client._datasource import RemoteDatasource

__all__ = ["get_tf_dataset", "get_tf_generator", "infer_output_signature"]


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


def get_tf_dataset(
    datasource: RemoteDatasource,
    keys: Sequence[str] | None = None,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    output_signature: dict[str, Any] | None = None,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of the datasource's samples (dicts of tensors), batched if ``batch_size`` is given.

    The signature is inferred (see :func:`infer_output_signature`) unless given.
    """
    signature = output_signature if output_signature is not None else infer_output_signature(datasource, keys)
    generator = get_tf_generator(datasource, list(signature), shuffle=shuffle, seed=seed, epoch=epoch)
    dataset = tf.data.Dataset.from_generator(generator, output_signature=signature)
    if batch_size is not None:
        dataset = dataset.batch(batch_size)
    return dataset
