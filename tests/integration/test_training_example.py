"""The training example (``examples/train_segmentation.py``) in its short mode, as a user runs it: two gloo ranks
train against a real server on a small phantom, segment the held-out subject through the server's assembler and
export it. The trained network must segment white and grey matter clearly better than the same network untrained
(same seed, so the same initial weights, ``--minutes 0``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from patchwire.service import PatchwireServer
from patchwire.service._phantom import make_phantom_dataset, make_phantom_subject

from _servers import child_env, server_in_thread

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_segmentation.py"
SHAPE = (64, 80, 64)
SUBJECTS = 3
SEED = 5
RUN_TIMEOUT_S = 150  # a bound for a run that hangs, never a pace


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PatchwireServer]:
    path = tmp_path_factory.mktemp("phantom") / "phantom.h5"
    make_phantom_dataset(path, subjects=SUBJECTS, shape=SHAPE, seed=SEED)
    with server_in_thread({"phantom": path}) as srv:
        yield srv


def train(server: PatchwireServer, out: Path, minutes: float, *extra: str) -> dict[str, Any]:
    """Runs the example against ``server``; returns its metrics.json."""
    command = [
        sys.executable,
        str(EXAMPLE),
        "--address",
        server.address,
        "--dataset",
        "phantom",
        "--held-out",
        "1",
        "--minutes",
        str(minutes),
        "--samples-per-volume",
        "4",
        "--out",
        str(out),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=child_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Dice on held-out subjects" in done.stdout
    metrics: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return metrics


@pytest.mark.slow
def test_trained_network_beats_the_untrained_one(server: PatchwireServer, tmp_path: Path) -> None:
    untrained = train(server, tmp_path / "untrained", 0, "--no-export")
    trained = train(server, tmp_path / "trained", 0.75)

    assert untrained["training"]["steps"] == 0
    assert trained["training"]["steps"] >= 10
    assert trained["config"]["held_out"] == ["Subject_3"]
    assert "Subject_3" not in trained["config"]["train_subjects"]
    for label in ("white matter", "grey matter"):
        before, after = untrained["mean_dice"][label], trained["mean_dice"][label]
        assert after >= before + 0.3, f"{label}: Dice {after:.3f} after training, {before:.3f} before"
    assert np.mean([trained["mean_dice"][k] for k in ("white matter", "grey matter")]) >= 0.6

    # the server's export of the blended probabilities and the segmentation, both in the subject's geometry
    truth = make_phantom_subject(2, SHAPE, SEED)
    probabilities = sitk.ReadImage(trained["subjects"]["Subject_3"]["probabilities"])
    segmentation = sitk.ReadImage(trained["subjects"]["Subject_3"]["segmentation"])
    for image in (probabilities, segmentation):
        assert image.GetSize() == truth.geometry.size
        assert image.GetOrigin() == truth.geometry.origin
        assert image.GetDirection() == truth.geometry.direction
    sums = sitk.GetArrayViewFromImage(probabilities).sum(axis=-1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-4)  # a Gaussian-weighted mean of softmax outputs
    labels = sitk.GetArrayFromImage(segmentation)
    expected = np.argmax(sitk.GetArrayFromImage(probabilities), axis=-1)
    np.testing.assert_array_equal(labels, expected)
    gt = truth.categories["labels"]["GT"]
    wm = 2 * np.sum((labels == 1) & (gt == 1)) / (np.sum(labels == 1) + np.sum(gt == 1))
    assert wm == pytest.approx(trained["mean_dice"]["white matter"])
