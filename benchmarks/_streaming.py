"""Sections b and c, streaming: patchwire's ``PytorchStreamingDataset`` from ``patchwire serve`` (default and small
block cache, LZ4 labels, ``--verify``, a training step with and without prefetch) and pymia's datasource with torch's
``DataLoader``, each loader measured by :func:`measure_loader` for a time budget after its warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.data as torch_data
from _launch import patchwire_server
from _machine import peak_rss_mb, reset_peak_rss
from _plan import BATCH_SIZE, CATEGORIES, DATASET, MB, TRAINING_STEP_MS, Mode, patterns, progress
from _pymia import load_pymia, load_pymia_torch

import patchwire.client as pw
from patchwire.client import extraction as pw_extr
from patchwire.client._datasource import PREFETCH_MESSAGES
from patchwire.client.torch import PytorchStreamingDataset


def batch_payload(batch: dict[str, Any]) -> tuple[int, int]:
    """(samples, bytes of the tensors) of one collated batch."""
    samples = 0
    nbytes = 0
    for key, value in batch.items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, torch.Tensor):
                nbytes += v.element_size() * v.nelement()
        if key == "sample_index":
            samples = len(value)
    return samples, nbytes


def epochs(ds: pw.RemoteDatasource, **stream_options: Any) -> Callable[[int], Iterator[dict[str, Any]]]:
    """``make_iterator(epoch)`` for :func:`measure_loader`: ``ds`` as ``PytorchStreamingDataset(batch_size=16,
    shuffle=True, seed=0, **stream_options)`` in ``DataLoader(batch_size=None, num_workers=0)``, a new iterator per
    epoch."""
    stream = PytorchStreamingDataset(ds, batch_size=BATCH_SIZE, shuffle=True, seed=0, **stream_options)
    loader = torch_data.DataLoader(stream, batch_size=None, num_workers=0)

    def make_iterator(epoch: int) -> Iterator[dict[str, Any]]:
        stream.set_epoch(epoch)
        return iter(loader)

    return make_iterator


def measure_loader(
    make_iterator: Callable[[int], Iterator[dict[str, Any]]], mode: Mode, step_s: float = 0.0
) -> dict[str, Any]:
    """Consumes epochs (``make_iterator(epoch)``): a warm-up (the first epoch, at most ``mode.warmup_s``), then the
    measured part until the budget or ``max_samples`` is reached; ``step_s``: a stand-in for a training step after
    every batch (a sleep: it holds no GIL, as a step waiting on a GPU)."""
    samples = nbytes = batches = 0
    ttfb: list[float] = []
    begin = time.perf_counter()
    start: float | None = None  # when the measured part began
    warmup = {"samples": 0, "seconds": 0.0}
    epoch = 0
    done = False
    while not done:
        if start is None and epoch > 0:  # the first epoch ended within the warm-up time
            start = time.perf_counter()
            warmup = {"samples": samples, "seconds": start - begin}
            samples = nbytes = batches = 0
        created = time.perf_counter()
        iterator = make_iterator(epoch)
        first = True
        for batch in iterator:
            if first:
                ttfb.append(time.perf_counter() - created)
                first = False
            n, b = batch_payload(batch)
            samples += n
            nbytes += b
            batches += 1
            if step_s:
                time.sleep(step_s)
            now = time.perf_counter()
            if start is None:
                if now - begin >= mode.warmup_s:  # a long first epoch: measure the rest of it
                    start = now
                    warmup = {"samples": samples, "seconds": now - begin}
                    samples = nbytes = batches = 0
            elif now - start >= mode.budget_s or samples >= mode.max_samples:
                done = True
                break
        del iterator  # ends the stream (patchwire) or shuts the workers down (torch) when left mid-epoch
        if first:
            raise RuntimeError("a loader yielded no batch")
        epoch += 1
    assert start is not None
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "batches": batches,
        "bytes": nbytes,
        "seconds": seconds,
        "epochs_started": epoch,
        "warmup_samples": warmup["samples"],
        "warmup_seconds": warmup["seconds"],
        "samples_per_s": samples / seconds,
        "bytes_per_s": nbytes / seconds,
        "mb_per_s": nbytes / seconds / MB,
        "ttfb_ms": ttfb[0] * 1e3,
        "ttfb_ms_later_epochs": [t * 1e3 for t in ttfb[1:]],
    }


def bench_patchwire_streaming(
    mode: Mode, data: Path, work: Path, logs: Path, cache_mib: float | None, tag: str, label_compression: str | None
) -> tuple[dict[str, Any], dict[str, float | None], bool]:
    """Every pattern through one ``patchwire serve`` (``cache_mib`` None: the server's default block cache)."""
    results: dict[str, Any] = {}
    server_rss: dict[str, float | None] = {}
    server = patchwire_server(data, work / f"state-stream-{tag}", logs / f"server-stream-{tag}.log", cache_mib)
    with server as launched:
        proc = launched.process
        server_rss["idle"] = peak_rss_mb(proc.pid)
        reset_ok = True
        with pw.connect(launched.address) as client:
            for pattern in patterns(mode):
                reset_ok &= reset_peak_rss(proc.pid)
                ds = client.datasource(
                    DATASET,
                    pattern.patchwire_indexing(),
                    pw_extr.DataExtractor(CATEGORIES),
                    label_compression=label_compression,
                )
                result = measure_loader(epochs(ds), mode)
                result["dataset_samples"] = len(ds)
                result["server_peak_rss_mb"] = server_rss[pattern.key] = peak_rss_mb(proc.pid)
                results[pattern.key] = result
                ds.close()
                progress(f"patchwire ({tag}) {pattern.label}: {result['samples_per_s']:.0f} samples/s")
    return results, server_rss, reset_ok


def _pooled(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two runs of the same loaders: the first's numbers with its throughputs replaced by the two runs' means (both
    kept in ``runs_samples_per_s``)."""
    pooled: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        pooled[key] = {
            **a,
            "samples_per_s": (a["samples_per_s"] + b["samples_per_s"]) / 2,
            "bytes_per_s": (a["bytes_per_s"] + b["bytes_per_s"]) / 2,
            "mb_per_s": (a["mb_per_s"] + b["mb_per_s"]) / 2,
            "runs_samples_per_s": [a["samples_per_s"], b["samples_per_s"]],
        }
    return pooled


def bench_default_and_lz4(
    mode: Mode, data: Path, work: Path, logs: Path
) -> tuple[dict[str, Any], dict[str, float | None], bool, dict[str, Any]]:
    """The default configuration and ``label_compression='lz4'`` (default block cache), each twice, in the order
    default, lz4, lz4, default: the machine's speed drifts within a run (the ceiling before and after streaming
    differs by up to a fifth), and measured one after the other the later one gained from it. Each configuration's
    numbers are the means of its two runs; the default's RSS and time to first batch are its first run's."""
    default, rss, reset_ok = bench_patchwire_streaming(mode, data, work, logs, None, "default cache", None)
    lz4_first, _, _ = bench_patchwire_streaming(mode, data, work, logs, None, "lz4 labels", "lz4")
    lz4_second, _, _ = bench_patchwire_streaming(mode, data, work, logs, None, "lz4 labels, again", "lz4")
    default_second, _, _ = bench_patchwire_streaming(mode, data, work, logs, None, "default cache, again", None)
    return _pooled(default, default_second), rss, reset_ok, _pooled(lz4_first, lz4_second)


def bench_verify(mode: Mode, data: Path, work: Path, logs: Path, cache_mib: float) -> dict[str, Any]:
    """Axial slices without and with ``patchwire serve --verify`` (a CRC-32 of every stored block taken at start,
    every block read from disk checked before it is cached or served), with the default block cache (blocks are read
    once) and the small one (read again and again); ``server_start_s``: process start to listening (``--verify``
    reads the whole file first)."""
    axial = patterns(mode)[0]
    results: dict[str, Any] = {}
    for cache_key, cache in (("default_cache", None), ("small_cache", cache_mib)):
        for verify in (False, True):
            key = f"{cache_key}_verify" if verify else cache_key
            started = time.perf_counter()
            server = patchwire_server(
                data, work / f"state-{key}", logs / f"server-{key}.log", cache, ("--verify",) if verify else ()
            )
            with server as launched, pw.connect(launched.address) as client:
                start_s = time.perf_counter() - started
                ds = client.datasource(DATASET, axial.patchwire_indexing(), pw_extr.DataExtractor(CATEGORIES))
                results[key] = measure_loader(epochs(ds), mode) | {"server_start_s": start_s}
                ds.close()
            progress(f"patchwire {axial.label}, {key}: {results[key]['samples_per_s']:.0f} samples/s")
    return results


def bench_training_step(mode: Mode, data: Path, work: Path, logs: Path) -> dict[str, Any]:
    """Streaming with a training step between batches (``TRAINING_STEP_MS`` per pattern), with the client's
    prefetch thread (the default) and without it: how much of the step the stream hides."""
    results: dict[str, Any] = {}
    server = patchwire_server(data, work / "state-step", logs / "server-step.log")
    with server as launched, pw.connect(launched.address) as client:
        for pattern in patterns(mode):
            if pattern.key not in TRAINING_STEP_MS:
                continue
            step_ms = TRAINING_STEP_MS[pattern.key]
            ds = client.datasource(DATASET, pattern.patchwire_indexing(), pw_extr.DataExtractor(CATEGORIES))
            results[pattern.key] = {"step_ms": step_ms}
            for prefetch in (PREFETCH_MESSAGES, 0):
                result = measure_loader(epochs(ds, prefetch=prefetch), mode, step_ms / 1e3)
                results[pattern.key][f"prefetch{prefetch}"] = result
                progress(
                    f"patchwire {pattern.label}, {step_ms:g} ms step, prefetch {prefetch}: "
                    f"{result['samples_per_s']:.0f} samples/s"
                )
            ds.close()
    return results


def bench_pymia_streaming(mode: Mode, data: Path) -> dict[str, Any]:
    pm = load_pymia()
    adapter_cls = load_pymia_torch().PytorchDatasetAdapter
    results: dict[str, Any] = {}
    for pattern in patterns(mode):
        results[pattern.key] = {}
        for workers in (0, 2):
            # A fresh datasource per loader: pymia keeps its HDF5 reader open, which forked workers must not share.
            ds = pm.extraction.PymiaDatasource(
                str(data), pattern.pymia_indexing(), pm.extraction.DataExtractor(categories=CATEGORIES)
            )
            generator = torch.Generator().manual_seed(0)
            loader = torch_data.DataLoader(
                adapter_cls(ds), batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, generator=generator
            )

            def make_iterator(epoch: int, loader: Any = loader) -> Iterator[Any]:
                return iter(loader)  # shuffling draws a new order per epoch from the loader's generator

            result = measure_loader(make_iterator, mode)
            result["dataset_samples"] = len(ds)
            results[pattern.key][f"workers{workers}"] = result
            ds.close_reader()
            progress(f"pymia {pattern.label} workers={workers}: {result['samples_per_s']:.0f} samples/s")
    return results
