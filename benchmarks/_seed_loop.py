"""Section f, the seed loop: pymia's example loop with only the construction lines changed, pymia vs patchwire.

The loop is pymia's extraction/assembly example: ``DataExtractor(images, labels)``, a ``Permute`` of the images to
channel-first, the map-style ``PytorchDatasetAdapter`` in ``DataLoader(batch_size=2, shuffle=..., num_workers=...)``
(default collate). pymia reads the benchmark file locally; patchwire's datasource comes from ``patchwire serve`` on
the same file. Each cell (pattern x shuffle x workers) runs pymia, then patchwire, then both again (interleaved
rounds, the median counts; the smoke run has one): a fixed number of batches per round after one warm-up round, timed
from the iterator's creation (worker start-up included, as a user's epoch has it).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils.data as torch_data
from _launch import patchwire_server
from _plan import CATEGORIES, DATASET, Mode, Pattern, progress
from _pymia import load_pymia, load_pymia_torch

import patchwire.client as pw
from patchwire.client import extraction as pw_extr
from patchwire.client import transformation as pw_tfm
from patchwire.client.torch import PytorchDatasetAdapter

SEED_BATCH_SIZE = 2
SEED_ROUNDS = 5
"""Measured rounds per cell (after one warm-up round): with workers a round of 64^3 patches is one short epoch, most
of it torch starting the workers, and single rounds of either loader varied by 10% on the benchmark machine."""


def seed_patterns(mode: Mode) -> list[Pattern]:
    return [
        Pattern("axial", "axial slices (axis 0)", "slice", axis=0),
        Pattern("patches", f"{mode.patch}^3 patches", "patch", patch=mode.patch),
    ]


def _permutation(pattern: Pattern) -> tuple[int, ...]:
    return (2, 0, 1) if pattern.kind == "slice" else (3, 0, 1, 2)


def seed_batches(mode: Mode) -> int:
    """Batches per measured round: 300 as a user's short epoch (the smoke run: 10)."""
    return 10 if mode.name == "smoke" else 300


def time_loop(loader: torch_data.DataLoader[Any], batches: int) -> float:
    """Samples/s of the seed loop's first ``batches`` batches of a new iterator (start-up included)."""
    start = time.perf_counter()
    samples = 0
    for n, batch in enumerate(loader):
        samples += len(batch["sample_index"])
        if n + 1 >= batches:
            break
    return samples / (time.perf_counter() - start)


def _loader(adapter: Any, shuffle: bool, workers: int) -> torch_data.DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    return torch_data.DataLoader(
        adapter, batch_size=SEED_BATCH_SIZE, shuffle=shuffle, num_workers=workers, generator=generator
    )


def _round(adapter: Any, ds: Any, shuffle: bool, workers: int, batches: int) -> float:
    return time_loop(_loader(adapter(ds), shuffle, workers), batches)


def bench_seed_loop(mode: Mode, data: Path, work: Path, logs: Path) -> dict[str, Any]:
    """``{pattern: {"shuffle{0,1}_workers{0,2}": {"pymia": samples/s, "patchwire": samples/s, "ratio": ...}}}``."""
    pm = load_pymia()
    pymia_adapter = load_pymia_torch().PytorchDatasetAdapter
    batches = seed_batches(mode)
    results: dict[str, Any] = {}
    with (
        patchwire_server(data, None, logs / "server-seed-loop.log") as launched,
        pw.connect(launched.address) as client,
    ):
        for pattern in seed_patterns(mode):
            results[pattern.key] = {}
            permutation = _permutation(pattern)
            for shuffle in (False, True):
                for workers in (0, 2):
                    # Fresh datasources per cell: pymia keeps its HDF5 reader open, which forked workers must not
                    # share; patchwire's channels are reopened per process either way.
                    pymia_ds = pm.extraction.PymiaDatasource(
                        str(data),
                        pattern.pymia_indexing(),
                        pm.extraction.DataExtractor(categories=CATEGORIES),
                        pm.transformation.Permute(permutation=permutation, entries=("images",)),
                    )
                    pw_ds = client.datasource(
                        DATASET,
                        pattern.patchwire_indexing(),
                        pw_extr.DataExtractor(CATEGORIES),
                        pw_tfm.Permute(permutation=permutation, entries=("images",)),
                    )
                    loaders: dict[str, Callable[[], float]] = {
                        "pymia": functools.partial(_round, pymia_adapter, pymia_ds, shuffle, workers, batches),
                        "patchwire": functools.partial(_round, PytorchDatasetAdapter, pw_ds, shuffle, workers, batches),
                    }
                    runs: dict[str, list[float]] = {name: [] for name in loaders}
                    for round_ in range(1 + (1 if mode.name == "smoke" else SEED_ROUNDS)):
                        for name, measure in loaders.items():
                            value = measure()
                            if round_:  # round 0 warms caches up
                                runs[name].append(value)
                    pymia_ds.close_reader()
                    pw_ds.close()
                    cell = {name: statistics.median(values) for name, values in runs.items()}
                    cell["ratio"] = cell["patchwire"] / cell["pymia"]
                    cell["runs"] = runs
                    key = f"shuffle{int(shuffle)}_workers{workers}"
                    results[pattern.key][key] = cell
                    progress(
                        f"seed loop {pattern.label} shuffle={shuffle} workers={workers}: pymia "
                        f"{cell['pymia']:.0f}, patchwire {cell['patchwire']:.0f} samples/s ({cell['ratio']:.2f}x)"
                    )
    return results
