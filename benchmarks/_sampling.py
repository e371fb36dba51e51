"""Section g, random patches for training: label-balanced 64^3 patches, without and with a typical augmentation
chain, as a training loop receives them.

- **patchwire**: ``LabelSampler`` patches cut and augmented on the server (``patchwire serve`` in a subprocess) from
  subject windows of two subjects, streamed by ``PytorchStreamingDataset`` into ``DataLoader(batch_size=None)``.
  The server's CPU time over the measured part gives samples per server core-second: where the server's CPU becomes
  the limit.
- **TorchIO**: its ``Queue`` with a ``LabelSampler`` of the same probabilities over ``SubjectsDataset`` subjects
  held in memory (read from the same file), the chain as TorchIO users write it (transforms on each loaded subject,
  before sampling), ``DataLoader(queue, batch_size=16)``; locally, in this process.
- **pymia**: its grid patches (``PatchWiseIndexing``) with pymia's own augmentation (``RandomMirror``,
  ``RandomRotation90``; pymia has no random patch sampling), ``PymiaDatasource`` in ``DataLoader(shuffle=True)``,
  locally.

Every loader is measured by ``measure_loader`` (same budget as the streaming patterns); throughput is also given
as a fraction of the run's raw gRPC ceiling (bytes of the delivered tensors per second / the ceiling's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.utils.data as torch_data
from _launch import patchwire_server
from _plan import BATCH_SIZE, CATEGORIES, DATASET, Mode, progress
from _pymia import load_pymia, load_pymia_torch
from _streaming import measure_loader

import patchwire.client as pw
from patchwire.client import augmentation as pw_aug
from patchwire.client import extraction as pw_extr
from patchwire.client import transformation as pw_tfm
from patchwire.client.torch import PytorchStreamingDataset

#: The centre's label: half the patches on the three small structures (3, 4, 5), the rest on the tissue classes.
LABEL_PROBABILITIES = {0: 0.1, 1: 0.2, 2: 0.2, 3: 0.5 / 3, 4: 0.5 / 3, 5: 0.5 / 3}
SAMPLES_PER_VOLUME = 16
SUBJECTS_PER_WINDOW = 2
NOISE_STD = (0.0, 25.0)  # the phantom's intensities run to about 1000


def _patchwire_chain(augment: bool) -> Any:
    steps: list[Any] = []
    if augment:
        steps = [
            pw_aug.RandomFlip(axes=(0, 1, 2)),
            pw_aug.RandomAffine(scales=(0.9, 1.1), degrees=10),
            pw_aug.RandomGamma(),
            pw_aug.RandomNoise(std=NOISE_STD),
        ]
    steps.append(pw_tfm.Permute((3, 0, 1, 2), entries=("images",)))  # channel-first for a network
    return pw_tfm.ComposeTransform(steps)


def _server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_patchwire_sampling(mode: Mode, data: Path, work: Path, logs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    server = patchwire_server(data, work / "state-sampling", logs / "server-sampling.log", None)
    with server as launched, pw.connect(launched.address) as client:
        for augment in (False, True):
            ds = client.datasource(
                DATASET,
                pw_extr.LabelSampler(mode.patch, LABEL_PROBABILITIES, samples_per_volume=SAMPLES_PER_VOLUME),
                pw_extr.DataExtractor(CATEGORIES),
                _patchwire_chain(augment),
            )
            stream = PytorchStreamingDataset(
                ds,
                batch_size=BATCH_SIZE,
                shuffle=True,
                seed=0,
                epoch_options=pw.EpochOptions(subjects_per_window=SUBJECTS_PER_WINDOW),
            )
            loader = torch_data.DataLoader(stream, batch_size=None, num_workers=0)

            def make_iterator(epoch: int, stream: Any = stream, loader: Any = loader) -> Iterator[Any]:
                stream.set_epoch(epoch)
                return iter(loader)

            cpu_before = _server_cpu_s(launched.process.pid)
            result = measure_loader(make_iterator, mode)
            cpu = _server_cpu_s(launched.process.pid) - cpu_before
            # the whole run's server CPU (warm-up included) against all its samples
            result["server_cpu_s"] = cpu
            result["samples_per_server_cpu_s"] = (result["samples"] + result["warmup_samples"]) / max(cpu, 1e-9)
            results["augmented" if augment else "plain"] = result
            ds.close()
            progress(
                f"patchwire label-balanced {mode.patch}^3{' + augmentation' if augment else ''}: "
                f"{result['samples_per_s']:.0f} samples/s, {result['samples_per_server_cpu_s']:.0f} per server "
                "CPU-second"
            )
    return results


def _torchio_subjects(data: Path) -> list[Any]:
    import torchio as tio

    subjects = []
    with h5py.File(data, "r") as f:
        for name in f["data/images"]:
            images = np.asarray(f["data/images"][name])  # (z, y, x, channels)
            labels = np.asarray(f["data/labels"][name])
            subjects.append(
                tio.Subject(
                    images=tio.ScalarImage(tensor=torch.from_numpy(np.moveaxis(images, -1, 0).copy())),
                    labels=tio.LabelMap(tensor=torch.from_numpy(np.moveaxis(labels, -1, 0).astype(np.int64))),
                )
            )
    return subjects


def bench_torchio_queue(mode: Mode, data: Path) -> dict[str, Any]:
    import torchio as tio

    results: dict[str, Any] = {}
    subjects = _torchio_subjects(data)
    for augment in (False, True):
        transform = (
            tio.Compose(
                [
                    tio.RandomFlip(axes=(0, 1, 2)),
                    tio.RandomAffine(scales=(0.9, 1.1), degrees=10),
                    tio.RandomGamma(),
                    tio.RandomNoise(std=NOISE_STD),
                ]
            )
            if augment
            else None
        )
        dataset = tio.SubjectsDataset(subjects, transform=transform)
        sampler = tio.LabelSampler(mode.patch, label_name="labels", label_probabilities=LABEL_PROBABILITIES)
        queue = tio.Queue(
            dataset,
            max_length=SAMPLES_PER_VOLUME * SUBJECTS_PER_WINDOW,
            samples_per_volume=SAMPLES_PER_VOLUME,
            sampler=sampler,
            num_workers=0,
            verbose=False,
        )
        loader = torch_data.DataLoader(queue, batch_size=BATCH_SIZE, num_workers=0)

        def make_iterator(epoch: int, loader: Any = loader) -> Iterator[dict[str, Any]]:
            for batch in loader:
                yield {
                    "images": batch["images"][tio.DATA],
                    "labels": batch["labels"][tio.DATA],
                    "sample_index": torch.arange(len(batch["images"][tio.DATA])),
                }

        result = measure_loader(make_iterator, mode)
        results["augmented" if augment else "plain"] = result
        progress(f"TorchIO Queue + LabelSampler{' + augmentation' if augment else ''}: {result['samples_per_s']:.0f}")
    return results


def bench_pymia_augmented(mode: Mode, data: Path) -> dict[str, Any]:
    pm = load_pymia()
    import pymia.data.augmentation as pm_aug

    adapter_cls = load_pymia_torch().PytorchDatasetAdapter
    chain = pm.transformation.ComposeTransform(
        [
            pm_aug.RandomMirror(axis=0, p=0.5),
            pm_aug.RandomRotation90(axes=(0, 1), p=0.5),
            pm.transformation.Permute((3, 0, 1, 2), entries=("images",)),
        ]
    )
    ds = pm.extraction.PymiaDatasource(
        str(data),
        pm.extraction.PatchWiseIndexing((mode.patch,) * 3),
        pm.extraction.DataExtractor(categories=CATEGORIES),
        chain,
    )
    np.random.seed(0)
    loader = torch_data.DataLoader(
        adapter_cls(ds), batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    result = measure_loader(lambda epoch: iter(loader), mode)
    ds.close_reader()
    progress(f"pymia grid patches + its augmentation: {result['samples_per_s']:.0f} samples/s")
    return {"augmented": result}


def bench_sampling(mode: Mode, data: Path, work: Path, logs: Path) -> dict[str, Any]:
    return {
        "patchwire": bench_patchwire_sampling(mode, data, work, logs),
        "torchio": bench_torchio_queue(mode, data),
        "pymia": bench_pymia_augmented(mode, data),
        "label_probabilities": {str(k): v for k, v in LABEL_PROBABILITIES.items()},
        "samples_per_volume": SAMPLES_PER_VOLUME,
        "subjects_per_window": SUBJECTS_PER_WINDOW,
    }
