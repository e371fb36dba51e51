"""The seed example's TensorFlow variant (pymia's notebook, "TensorFlow adaptions": no Permute, channel-last,
``get_tf_generator`` + ``from_generator(output_types=...)`` + ``batch(2)``, the two-layer Keras CNN, prediction
assembled as it comes, ``subjects_ready``, ``direct_extract``) run remotely — datasource and assembler on a
patchwire server — and with pymia locally: the same batches, predictions and assembled subjects. The same loop on
``get_tf_dataset(batch_size=2)`` (the server batches) gives them too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

tf = pytest.importorskip("tensorflow")

import patchwire.client as pw  # noqa: E402
from patchwire.client import definition as defs  # noqa: E402
from patchwire.client import extraction as extr  # noqa: E402
from patchwire.client.tensorflow import get_tf_dataset, get_tf_generator  # noqa: E402

from _checks import check_seed_runs_equal  # noqa: E402
from _pymia_oracle import load_pymia  # noqa: E402


def _network() -> Any:
    tf.keras.utils.set_random_seed(0)
    network = tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(8, kernel_size=3, padding="same"),
            tf.keras.layers.Conv2D(2, kernel_size=3, padding="same", activation="sigmoid"),
        ]
    )
    network.build((None, 24, 16, 2))
    return network


def _notebook_loader(gen_fn: Callable[[], Any]) -> Any:
    """The notebook's loader: ``from_generator`` with ``output_types``, batches of 2."""
    tf_dataset = tf.data.Dataset.from_generator(
        generator=gen_fn, output_types={defs.KEY_IMAGES: tf.float32, defs.KEY_SAMPLE_INDEX: tf.int64}
    )
    return tf_dataset.batch(2)


def _run(dataset: Any, loader: Any, network: Any, assembler: Any, direct_extractor: Any) -> tuple[list, dict]:
    """The notebook's loop: predict, assemble, and take each subject as soon as it is ready."""
    nb_batches = len(dataset) // 2
    batches, assembled = [], {}
    for i, batch in enumerate(loader):
        x, sample_indices = batch[defs.KEY_IMAGES], batch[defs.KEY_SAMPLE_INDEX]
        prediction = network(x)
        numpy_prediction = prediction.numpy()  # channel-last already: no transpose
        batches.append((x.numpy(), sample_indices.numpy(), numpy_prediction))
        assembler.add_batch(numpy_prediction, sample_indices.numpy(), i == nb_batches - 1)
        for subject_index in assembler.subjects_ready:
            subject_prediction = assembler.get_assembled_subject(subject_index)
            direct_sample = dataset.direct_extract(direct_extractor, subject_index)
            assembled[subject_index] = (
                subject_prediction,
                direct_sample[defs.KEY_LABELS],
                direct_sample[defs.KEY_PROPERTIES],
            )
    return batches, assembled


def _check_equal(remote: tuple[list, dict], local: tuple[list, dict]) -> None:
    check_seed_runs_equal(remote, local, (2, 24, 16, 2), (20, 24, 16, 2))


def test_seed_example_tensorflow_remote_equals_local(client: pw.Client, tiny_h5: Path) -> None:
    pymia = load_pymia()
    import pymia.data.backends.tensorflow as pymia_tf  # after load_pymia(): needs its numpy shim

    network = _network()
    local = pymia.extraction.PymiaDatasource(
        str(tiny_h5),
        pymia.extraction.SliceIndexing(),
        pymia.extraction.DataExtractor(categories=(pymia.definition.KEY_IMAGES,)),
        None,  # the notebook's TensorFlow adaption: no Permute
    )
    local_run = _run(
        local,
        _notebook_loader(pymia_tf.get_tf_generator(local)),
        network,
        pymia.assembler.SubjectAssembler(local),
        pymia.extraction.ComposeExtractor(
            [pymia.extraction.ImagePropertiesExtractor(), pymia.extraction.DataExtractor(categories=(defs.KEY_LABELS,))]
        ),
    )

    # the seed example with only the construction of the data source (and the import of get_tf_generator) changed
    extractor = extr.DataExtractor(categories=(defs.KEY_IMAGES,))
    dataset = client.datasource("tiny", extr.SliceIndexing(), extractor, None)
    direct_extractor = extr.ComposeExtractor(
        [extr.ImagePropertiesExtractor(), extr.DataExtractor(categories=(defs.KEY_LABELS,))]
    )
    remote_run = _run(
        dataset, _notebook_loader(get_tf_generator(dataset)), network, client.assembler(dataset), direct_extractor
    )
    _check_equal(remote_run, local_run)

    # patchwire's own loader: the server batches, the signature is inferred and the length known
    loader = get_tf_dataset(dataset, keys=[defs.KEY_IMAGES, defs.KEY_SAMPLE_INDEX], batch_size=2)
    assert len(loader) == 30
    _check_equal(_run(dataset, loader, network, client.assembler(dataset), direct_extractor), local_run)
