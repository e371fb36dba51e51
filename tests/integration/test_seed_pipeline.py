"""The seed example (slice-wise extraction, Permute to channel-first, torch DataLoader with batch size 2, a small
CNN, prediction back to channel-last, assembly, subjects_ready, direct_extract) run remotely — datasource and
assembler on a patchwire server — and with pymia locally: the same batches, predictions and assembled subjects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.utils.data as torch_data

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.client.torch import PytorchDatasetAdapter

from _checks import check_seed_runs_equal
from _pymia_oracle import load_pymia


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels=2, out_channels=8, kernel_size=3, padding=1),
        nn.Conv2d(in_channels=8, out_channels=1, kernel_size=3, padding=1),
        nn.Sigmoid(),
    ).eval()


def _run(dataset, adapter, assembler, direct_extractor) -> tuple[list, dict]:
    loader = torch_data.DataLoader(adapter, batch_size=2, shuffle=False)
    network = _network()
    nb_batches = len(loader)
    batches, assembled = [], {}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            x, sample_indices = batch[defs.KEY_IMAGES], batch[defs.KEY_SAMPLE_INDEX]
            prediction = network(x)
            numpy_prediction = prediction.numpy().transpose((0, 2, 3, 1))
            batches.append((x.numpy().copy(), sample_indices.numpy().copy(), numpy_prediction))
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


def test_seed_example_remote_equals_local(client: pw.Client, tiny_h5: Path) -> None:
    pymia = load_pymia()
    local = pymia.extraction.PymiaDatasource(
        str(tiny_h5),
        pymia.extraction.SliceIndexing(),
        pymia.extraction.DataExtractor(categories=(pymia.definition.KEY_IMAGES,)),
        pymia.transformation.Permute(permutation=(2, 0, 1), entries=(pymia.definition.KEY_IMAGES,)),
    )
    import pymia.data.backends.pytorch as pymia_torch  # after load_pymia(): needs its numpy shim

    local_batches, local_assembled = _run(
        local,
        pymia_torch.PytorchDatasetAdapter(local),
        pymia.assembler.SubjectAssembler(local),
        pymia.extraction.ComposeExtractor(
            [pymia.extraction.ImagePropertiesExtractor(), pymia.extraction.DataExtractor(categories=(defs.KEY_LABELS,))]
        ),
    )

    # the seed example with only the construction of the data source changed
    extractor = extr.DataExtractor(categories=(defs.KEY_IMAGES,))
    transform = tfm.Permute(permutation=(2, 0, 1), entries=(defs.KEY_IMAGES,))
    dataset = client.datasource("tiny", extr.SliceIndexing(), extractor, transform)
    direct_extractor = extr.ComposeExtractor(
        [extr.ImagePropertiesExtractor(), extr.DataExtractor(categories=(defs.KEY_LABELS,))]
    )
    assembler = client.assembler(dataset)  # pymia: assm.SubjectAssembler(dataset)
    remote_batches, remote_assembled = _run(dataset, PytorchDatasetAdapter(dataset), assembler, direct_extractor)

    remote, local = (remote_batches, remote_assembled), (local_batches, local_assembled)
    check_seed_runs_equal(remote, local, (2, 2, 24, 16), (20, 24, 16, 1))


def test_seed_example_tensorflow_variant(client: pw.Client) -> None:
    tf = pytest.importorskip("tensorflow")
    from patchwire.client.tensorflow import get_tf_generator

    dataset = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,)))
    gen_fn = get_tf_generator(dataset)
    tf_dataset = tf.data.Dataset.from_generator(
        generator=gen_fn, output_types={defs.KEY_IMAGES: tf.float32, defs.KEY_SAMPLE_INDEX: tf.int64}
    )
    loader = tf_dataset.batch(2)
    tf.keras.utils.set_random_seed(0)
    network = tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(8, kernel_size=3, padding="same"),
            tf.keras.layers.Conv2D(2, kernel_size=3, padding="same", activation="sigmoid"),
        ]
    )
    seen = []
    for batch in loader:
        prediction = network(batch[defs.KEY_IMAGES]).numpy()
        assert prediction.shape == (2, 24, 16, 2)
        seen.extend(batch[defs.KEY_SAMPLE_INDEX].numpy().tolist())
    assert seen == list(range(len(dataset))) and len(seen) // 2 == len(dataset) // 2


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`patchwire demo`: starts its own server on the phantom dataset (generated on first use) and predicts it."""
    env = {
        "PATCHWIRE_HOME": str(tmp_path),
        "PATH": "",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "patchwire.cli", "demo", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for s in range(1, 5):
        expected = f"Subject_{s}: assembled 181x217x181x1 float32 from 181 slices, checked,"
        assert any(line.strip().startswith(expected) for line in lines), result.stdout
    assert any(line.startswith("724 slices of 4 subjects predicted and assembled") for line in lines), result.stdout
    (stats,) = [line for line in lines if line.startswith("input: waited for data ")]
    assert "% of " in stats and " 724 samples, " in stats and stats.endswith(("input-bound", "compute-bound")), stats
    assert (tmp_path / "phantom-v1.h5").is_file()
