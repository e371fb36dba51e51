"""get_tf_dataset against a real server with TensorFlow (CPU) and Keras: a new epoch (and shuffle) every time Keras
iterates the dataset, an exact cardinality (no "ran out of data"), sharding by tf.distribute.InputContext with equal
batch counts, distribute_datasets_from_function, and the epoch set from outside."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import patchwire.client as pw  # noqa: E402
from patchwire.client import definition as defs  # noqa: E402
from patchwire.client import extraction as extr  # noqa: E402
from patchwire.client._epochs import EpochOptions  # noqa: E402
from patchwire.client.tensorflow import EpochCounter, get_tf_dataset  # noqa: E402

SAMPLES = 60  # tiny: 3 subjects of 20 axial slices of 24x16


@pytest.fixture(scope="module")
def ds(client: pw.Client) -> pw.RemoteDatasource:
    return client.datasource(
        "tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS))
    )


def _order(ds: pw.RemoteDatasource, batch_size: int, seed: int, epoch: int) -> list[int]:
    """The server's order of an epoch, read directly."""
    return [i for b in ds.batches(batch_size, shuffle=True, seed=seed, epoch=epoch) for i in b[defs.KEY_SAMPLE_INDEX]]


def _recording(seen: list[list[int]]) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
    """A map to Keras's (x, y) that appends each batch's sample indices to ``seen`` as the batch passes."""

    def record(indices: np.ndarray) -> np.ndarray:
        seen.append(indices.tolist())
        return indices

    def to_xy(batch: dict[str, Any]) -> tuple[Any, Any]:
        recorded = tf.numpy_function(record, [batch[defs.KEY_SAMPLE_INDEX]], tf.int64)
        with tf.control_dependencies([recorded]):
            x = tf.identity(batch[defs.KEY_IMAGES])
        return x, tf.cast(batch[defs.KEY_LABELS], tf.float32)

    return to_xy


def _model() -> Any:
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [tf.keras.Input((24, 16, 2)), tf.keras.layers.Conv2D(1, kernel_size=3, padding="same", activation="sigmoid")]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _fit(model: Any, dataset: Any, **kwargs: Any) -> Any:
    """``model.fit`` that fails on Keras's warning for a dataset that ends before its announced steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(dataset, verbose=0, **kwargs)
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    return history


@pytest.mark.parametrize("prefetch", [False, True])
def test_keras_fit_streams_a_new_epoch_each_time(ds: pw.RemoteDatasource, prefetch: bool) -> None:
    counter = EpochCounter()
    dataset = get_tf_dataset(ds, batch_size=8, shuffle=True, seed=3, epoch=counter)
    assert int(dataset.cardinality()) == len(dataset) == 8  # 60 slices: 7 batches of 8 and one of 4
    seen: list[list[int]] = []
    train = dataset.map(_recording(seen))
    if prefetch:  # Keras makes the next epoch's iterator early: a prefetch must not start (or finish) an epoch
        train = train.prefetch(tf.data.AUTOTUNE)
    history = _fit(_model(), train, epochs=3)
    assert len(history.history["loss"]) == 3
    assert [len(b) for b in seen] == ([8] * 7 + [4]) * 3
    epochs = [[i for b in seen[k : k + 8] for i in b] for k in (0, 8, 16)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(SAMPLES))  # each epoch covers the data once
        assert order == _order(ds, 8, 3, e)  # in the server's order of (seed, epoch)
    assert epochs[0] != epochs[1] != epochs[2]
    assert counter.epoch == 3


def test_batches_carry_the_samples(client: pw.Client) -> None:
    ds = client.datasource(
        "tiny",
        extr.SliceIndexing(),
        extr.ComposeExtractor(
            [extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS)), extr.SubjectExtractor()]
        ),
    )
    dataset = get_tf_dataset(ds, batch_size=16, shuffle=True, seed=1)
    assert dataset.element_spec[defs.KEY_IMAGES].shape.as_list() == [None, 24, 16, 2]
    assert dataset.element_spec[defs.KEY_SUBJECT] == tf.TensorSpec([None], tf.string)
    sizes = []
    for batch in dataset:
        sizes.append(len(batch[defs.KEY_SAMPLE_INDEX]))
        for row, i in enumerate(batch[defs.KEY_SAMPLE_INDEX].numpy().tolist()):
            sample = ds[i]
            assert np.array_equal(batch[defs.KEY_IMAGES][row].numpy(), sample[defs.KEY_IMAGES])
            assert np.array_equal(batch[defs.KEY_LABELS][row].numpy(), sample[defs.KEY_LABELS])
            assert batch[defs.KEY_SUBJECT][row].numpy().decode() == sample[defs.KEY_SUBJECT]
            assert int(batch[defs.KEY_SUBJECT_INDEX][row]) == sample[defs.KEY_SUBJECT_INDEX]
    assert sizes == [16, 16, 16, 12]


def test_drop_remainder_gives_a_static_batch_size(ds: pw.RemoteDatasource) -> None:
    dataset = get_tf_dataset(ds, batch_size=16, drop_remainder=True)
    assert dataset.element_spec[defs.KEY_IMAGES].shape.as_list() == [16, 24, 16, 2]
    assert len(dataset) == 3
    indices = [b[defs.KEY_SAMPLE_INDEX].numpy().tolist() for b in dataset]
    assert [len(b) for b in indices] == [16] * 3 and [i for b in indices for i in b] == list(range(48))


def test_unbatched_dataset_counts_samples(ds: pw.RemoteDatasource) -> None:
    dataset = get_tf_dataset(ds, keys=[defs.KEY_IMAGES, defs.KEY_SAMPLE_INDEX], shuffle=True, seed=2, epoch=4)
    assert len(dataset) == SAMPLES
    assert [int(s[defs.KEY_SAMPLE_INDEX]) for s in dataset] == _order(ds, 1, 2, 4)


def _pipelines(ds: pw.RemoteDatasource, count: int, **kwargs: Any) -> list[Any]:
    return [
        get_tf_dataset(
            ds,
            batch_size=8,
            shuffle=True,
            seed=9,
            input_context=tf.distribute.InputContext(
                num_input_pipelines=count, input_pipeline_id=i, num_replicas_in_sync=count
            ),
            **kwargs,
        )
        for i in range(count)
    ]


def test_input_context_shards_disjointly_with_equal_batch_counts(ds: pw.RemoteDatasource) -> None:
    pipelines = _pipelines(ds, 2)
    batches = [[b[defs.KEY_SAMPLE_INDEX].numpy().tolist() for b in p] for p in pipelines]
    # a global batch of 8 is a per-replica batch of 4; each pipeline streams 30 of the 60 samples
    assert [len(p) for p in pipelines] == [len(b) for b in batches] == [8, 8]
    assert all(len(b) == 4 for p in batches for b in p[:-1]) and [len(p[-1]) for p in batches] == [2, 2]
    shards = [[i for b in p for i in b] for p in batches]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(SAMPLES))
    order = _order(ds, 8, 9, 0)
    assert shards == [order[0::2], order[1::2]]  # slices of the one global order


@pytest.mark.parametrize("balance", ["pad", "drop"])
def test_input_context_balances_uneven_shards(ds: pw.RemoteDatasource, balance: str) -> None:
    subset = list(range(0, SAMPLES, 2))[:29]  # 29 samples for 2 pipelines
    pipelines = _pipelines(ds, 2, epoch_options=EpochOptions(sample_subset=subset, shard_balance=balance))
    shards = [[i for b in p for i in b[defs.KEY_SAMPLE_INDEX].numpy().tolist()] for p in pipelines]
    per_pipeline = 15 if balance == "pad" else 14
    assert [len(s) for s in shards] == [per_pipeline] * 2
    assert [len(p) for p in pipelines] == [4, 4]  # 15 or 14 samples in per-replica batches of 4
    order = [
        i
        for b in ds.batches(8, True, 9, 0, epoch_options=EpochOptions(sample_subset=subset))
        for i in b[defs.KEY_SAMPLE_INDEX]
    ]
    if balance == "pad":  # the epoch's first sample again, torch's DistributedSampler's way
        assert shards == [order[0::2], order[1::2] + order[:1]]
    else:
        assert shards == [order[0:28:2], order[1:28:2]]


def test_input_context_refuses_unequal_shards(ds: pw.RemoteDatasource) -> None:
    # 13 and 12 samples: 4 and 3 per-replica batches of 4 (29 samples would give 4 batches each, which is fine)
    with pytest.raises(ValueError, match=r"would stream \[3, 4\] elements.*shard_balance"):
        _pipelines(ds, 2, epoch_options=EpochOptions(sample_subset=list(range(25))))


def test_distribute_datasets_from_function_with_the_default_strategy(ds: pw.RemoteDatasource) -> None:
    strategy = tf.distribute.get_strategy()
    seen: list[list[int]] = []

    def dataset_fn(context: Any) -> Any:
        dataset = get_tf_dataset(ds, batch_size=12, shuffle=True, seed=4, input_context=context)
        return dataset.map(_recording(seen))

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    with strategy.scope():
        model = _model()
    _fit(model, distributed, epochs=2)
    assert [len(b) for b in seen] == [12] * 10
    assert [i for b in seen[:5] for i in b] == _order(ds, 12, 4, 0)
    assert [i for b in seen[5:] for i in b] == _order(ds, 12, 4, 1)


def test_epoch_set_from_outside(ds: pw.RemoteDatasource) -> None:
    counter = EpochCounter(5)
    dataset = get_tf_dataset(ds, batch_size=10, shuffle=True, seed=8, epoch=counter)

    def indices(d: Any) -> list[int]:
        return [i for b in d for i in b[defs.KEY_SAMPLE_INDEX].numpy().tolist()]

    assert indices(dataset.take(2)) == _order(ds, 10, 8, 5)[:20]
    assert counter.epoch == 5  # an iteration abandoned early does not move the counter on
    assert indices(dataset) == _order(ds, 10, 8, 5)
    assert counter.epoch == 6
    counter.set_epoch(2)
    assert indices(dataset) == _order(ds, 10, 8, 2)
    with pytest.raises(ValueError, match="non-negative integer"):
        counter.set_epoch(-1)


def test_keras_callback_streams_kerass_epoch_number(ds: pw.RemoteDatasource) -> None:
    counter = EpochCounter()
    dataset = get_tf_dataset(ds, batch_size=20, shuffle=True, seed=6, epoch=counter)
    seen: list[list[int]] = []
    _fit(_model(), dataset.map(_recording(seen)), epochs=5, initial_epoch=3, callbacks=[counter.keras_callback()])
    assert [i for b in seen[:3] for i in b] == _order(ds, 20, 6, 3)
    assert [i for b in seen[3:] for i in b] == _order(ds, 20, 6, 4)


def test_bad_arguments(ds: pw.RemoteDatasource) -> None:
    with pytest.raises(ValueError, match="drop_remainder needs a batch_size"):
        get_tf_dataset(ds, drop_remainder=True)
    with pytest.raises(ValueError, match="batch_shard needs a batch_size"):
        get_tf_dataset(ds, epoch_options=EpochOptions(batch_shard=(0, 2)))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        get_tf_dataset(ds, batch_size=0)


@pytest.mark.parametrize(
    ("options", "drop"),
    [
        (EpochOptions(global_start=13), False),
        (EpochOptions(global_start=13, shard_balance="pad"), True),
        (EpochOptions(batch_shard=(1, 2)), False),
        (EpochOptions(batch_shard=(0, 3), shard_balance="drop"), True),
        (EpochOptions(sample_weights=[1.0] * SAMPLES, samples_per_epoch=25), False),
        (EpochOptions(sample_subset=list(range(7, 40)), subjects_per_window=1), True),
    ],
)
def test_cardinality_is_exact_for_epoch_options(ds: pw.RemoteDatasource, options: EpochOptions, drop: bool) -> None:
    dataset = get_tf_dataset(ds, batch_size=7, shuffle=True, seed=1, drop_remainder=drop, epoch_options=options)
    batches = [b[defs.KEY_SAMPLE_INDEX].numpy().tolist() for b in dataset]  # assert_cardinality checks it too
    assert len(dataset) == len(batches) > 0
    assert not drop or all(len(b) == 7 for b in batches)
