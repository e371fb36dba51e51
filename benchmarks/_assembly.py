"""Section d, assembly: every prediction of every subject posted through patchwire's assembler (a server with a
state folder, one without, and that one over the wire) and through pymia's ``SubjectAssembler``, interleaved runs,
the median counting; and what durable appends cost on this disk."""

from __future__ import annotations

import itertools
import os
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _launch import patchwire_server
from _machine import peak_rss_mb, reset_peak_rss
from _plan import (
    ASSEMBLERS,
    ASSEMBLY_WINDOW,
    BATCH_SIZE,
    CEILING_MESSAGE_BYTES,
    DATASET,
    DISK_APPEND_BYTES,
    MB,
    PREDICTION_KEY,
    Mode,
    progress,
)
from _pymia import load_pymia

import patchwire.client as pw
from patchwire.client import extraction as pw_extr


@dataclass
class PredictionBatch:
    indices: list[int]
    predictions: list[np.ndarray]
    runs: list[tuple[np.ndarray, np.ndarray]]
    """Consecutive samples of equal shape: (sample indices, stacked predictions)."""

    @property
    def uniform(self) -> bool:
        return len(self.runs) == 1


def prediction_batches(pymia_ds: Any, images: list[np.ndarray]) -> list[PredictionBatch]:
    """Every sample's prediction (its images region), in sample order, in batches of BATCH_SIZE."""
    out = []
    for start in range(0, len(pymia_ds), BATCH_SIZE):
        indices = list(range(start, min(start + BATCH_SIZE, len(pymia_ds))))
        predictions = []
        for i in indices:
            subject, index_expr = pymia_ds.indices[i]
            predictions.append(images[subject][index_expr.expression])
        runs = []
        pairs = list(zip(indices, predictions, strict=True))
        for _, group in itertools.groupby(pairs, key=lambda pair: pair[1].shape):
            items = list(group)
            runs.append((np.asarray([i for i, _ in items]), np.stack([p for _, p in items])))
        out.append(PredictionBatch(indices, predictions, runs))
    return out


def assembly_cases(pm: Any, mode: Mode) -> list[tuple[str, str, Any, Any]]:
    """What assembly is measured on, here and over the link: (key, label, pymia's indexing, patchwire's) for axial
    slices and grid patches of ``mode.patch`` (border patches kept, as a full prediction needs them)."""
    p = mode.patch
    return [
        ("slice", "slice-wise (axis 0)", pm.extraction.SliceIndexing(0), pw_extr.SliceIndexing(0)),
        (
            "patch",
            f"patch-wise {p}^3 (incomplete kept)",
            pm.extraction.PatchWiseIndexing((p,) * 3, ignore_incomplete=False),
            pw_extr.PatchWiseIndexing((p,) * 3, ignore_incomplete=False),
        ),
    ]


def subject_images(pm: Any, data: Path) -> list[np.ndarray]:
    """Every subject's ``images`` of the file, read by pymia: the predictions the assembly runs post."""
    extractor = pm.extraction.DataExtractor(categories=("images",))
    whole = pm.extraction.PymiaDatasource(str(data), None, extractor)
    images = [whole.direct_extract(extractor, s)["images"] for s in range(len(whole.get_subjects()))]
    whole.close_reader()
    return images


def bench_durable_writes(mode: Mode, work: Path) -> dict[str, Any]:
    """Appends of ``DISK_APPEND_BYTES`` with an fsync after each, into the folder the assembly server's state lives
    in: what acknowledging predictions durably can cost at most on this disk (one write and fsync per batch)."""
    total = mode.ceiling_messages * CEILING_MESSAGE_BYTES // 4
    block = bytes(range(256)) * (DISK_APPEND_BYTES // 256)
    path = work / "durable-writes.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(max(1, total // len(block))):
            os.write(fd, block)
            os.fsync(fd)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    written = max(1, total // len(block)) * len(block)
    return {"append_bytes": len(block), "bytes": written, "seconds": seconds, "mb_per_s": written / seconds / MB}


def bench_assembly(mode: Mode, data: Path, work: Path, logs: Path) -> tuple[dict[str, Any], dict[str, float | None]]:
    pm = load_pymia()
    cases = assembly_cases(pm, mode)
    results: dict[str, Any] = {}
    server_rss: dict[str, float | None] = {}
    image_extractor = pm.extraction.DataExtractor(categories=("images",))
    images = subject_images(pm, data)
    durable = patchwire_server(data, work / "state-assembly", logs / "server-assembly.log")
    in_memory = patchwire_server(data, None, logs / "server-assembly-in-memory.log")
    with durable as durable_server, in_memory as memory_server:
        servers = {"durable": durable_server, "in_memory": memory_server}
        for key, label, pymia_indexing, pw_indexing in cases:
            pymia_ds = pm.extraction.PymiaDatasource(str(data), pymia_indexing, image_extractor)
            batches = prediction_batches(pymia_ds, images)
            total_bytes = sum(pred.nbytes for b in batches for pred in b.predictions)
            results[key] = {"label": label}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in (*ASSEMBLERS, "pymia")}
            for _ in range(mode.assembly_runs):  # interleaved: every assembler meets the machine in the same states
                for name, (_, server, shared) in ASSEMBLERS.items():
                    proc, address = servers[server].process, servers[server].address
                    with pw.connect(address) as client:
                        reset_peak_rss(proc.pid)
                        remote_ds = client.datasource(DATASET, pw_indexing, pw_extr.DataExtractor(("images",)))
                        run = _assemble_patchwire(client, remote_ds, batches, images, shared)
                        run["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
                        remote_ds.close()
                    runs[name].append(run)
                runs["pymia"].append(_assemble_pymia(pm, pymia_ds, batches, images))
            pymia_ds.close_reader()
            for name, (shown, _, _) in ASSEMBLERS.items():
                peaks = [r["server_peak_rss_mb"] for r in runs[name] if r["server_peak_rss_mb"] is not None]
                server_rss[f"{key} {shown.removeprefix('patchwire, ')}"] = max(peaks, default=None)
            for name in (*ASSEMBLERS, "pymia"):
                result = results[key][name] = _median_run(runs[name])
                result["prediction_bytes"] = total_bytes
                result["mb_per_s"] = total_bytes / result["seconds"] / MB
                result["subjects_per_s"] = result["subjects"] / result["seconds"]
                result["samples"] = len(pymia_ds)
            del batches
            progress(
                f"assembly {label}: "
                + ", ".join(f"{name} {results[key][name]['subjects_per_s']:.2f}" for name in (*ASSEMBLERS, "pymia"))
                + " subjects/s"
            )
    return results, server_rss


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time, with every run's seconds, verified only if every run was, and the highest server
    RSS of any."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[len(ordered) // 2])
    out["runs_seconds"] = [r["seconds"] for r in runs]
    out["verified"] = all(r["verified"] for r in runs)
    if "server_peak_rss_mb" in out:
        peaks = [r["server_peak_rss_mb"] for r in runs if r["server_peak_rss_mb"] is not None]
        out["server_peak_rss_mb"] = max(peaks, default=None)
    return out


def _assemble_patchwire(
    client: pw.Client,
    remote_ds: pw.RemoteDatasource,
    batches: list[PredictionBatch],
    images: list[np.ndarray],
    shared_memory: bool | None,
) -> dict[str, Any]:
    assembler = client.assembler(remote_ds, window=ASSEMBLY_WINDOW, shared_memory=shared_memory)
    kept: dict[int, np.ndarray] = {}
    subjects = 0
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        last = n == len(batches) - 1
        if batch.uniform:
            assembler.add_batch(batch.runs[0][1], batch.runs[0][0], last)
        else:  # border patches of another shape in the same batch: one message all the same
            assembler.add_samples({PREDICTION_KEY: batch.predictions}, batch.indices, last)
        subjects += _take_ready(assembler, kept)
    seconds = time.perf_counter() - start
    used = assembler.uses_shared_memory
    assembler.delete()
    assembler.close()
    return {"seconds": seconds, "subjects": subjects, "verified": _verify(kept, images), "shared_memory": used}


def _assemble_pymia(
    pm: types.SimpleNamespace, pymia_ds: Any, batches: list[PredictionBatch], images: list[np.ndarray]
) -> dict[str, Any]:
    kept: dict[int, np.ndarray] = {}
    subjects = 0
    start = time.perf_counter()
    assembler = pm.assembler.SubjectAssembler(pymia_ds)
    for n, batch in enumerate(batches):
        for r, (indices, stacked) in enumerate(batch.runs):
            assembler.add_batch(stacked, indices, n == len(batches) - 1 and r == len(batch.runs) - 1)
        subjects += _take_ready(assembler, kept)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "subjects": subjects, "verified": _verify(kept, images)}


def _take_ready(assembler: Any, kept: dict[int, np.ndarray]) -> int:
    """Fetches every subject the assembler (patchwire's or pymia's) reports ready; keeps subject 0 for checking."""
    ready = sorted(assembler.subjects_ready)
    for subject in ready:
        volume = assembler.get_assembled_subject(subject)
        if subject == 0:
            kept[subject] = volume
    return len(ready)


def _verify(kept: dict[int, np.ndarray], images: list[np.ndarray]) -> bool:
    """Subject 0 assembled equals its images (after casting pymia's float64 back)."""
    return 0 in kept and np.array_equal(np.asarray(kept[0], dtype=np.float32), images[0])
