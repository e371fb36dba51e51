"""patchwire's benchmark: the gRPC ceiling, patchwire streaming, pymia 0.3.4 locally and assembly, in one run.

Usage::

    .venv/bin/python benchmarks/bench.py [--smoke] [--out DIR] [--budget SECONDS] [--cache-mb MB]

Sections (each measured on the same generated pymia-format file, page cache warm):

a. **ceiling** — raw gRPC server streaming of 1 MiB ``bytes`` messages over loopback; the server
   (``benchmarks/ceiling_server.py``) runs in a subprocess, the client here, both with patchwire's process settings
   (the allocator thresholds of ``patchwire.wire.malloc``, ``framing.channel_options()``). Measured before patchwire's
   streaming and again right after it; the median of all those runs is the run's ceiling.
b. **patchwire** — ``patchwire serve`` in a subprocess; here ``PytorchStreamingDataset(ds, batch_size=16,
   shuffle=True, seed=0)`` in ``DataLoader(batch_size=None, num_workers=0)`` for axial slices, axis-2 slices and
   cubic patches, each with ``DataExtractor(categories=('images', 'labels'))`` and the client's defaults; three
   times: with the server's default block cache (the dataset fits; the throughput targets use this run), with
   ``--cache-mb`` (default half the dataset file, so the dataset is larger than the cache; the RSS target uses this
   run), and with the default cache and ``label_compression='lz4'`` (what LZ4 label maps cost or bring here).
   Then axial slices and patches once more with a stand-in training step after every batch (a sleep of about a
   batch's receiving time), with the client's prefetch thread and without it.
c. **pymia** — ``PymiaDatasource`` + ``PytorchDatasetAdapter`` + ``DataLoader(batch_size=16, shuffle=True)`` (default
   collate) with ``num_workers`` 0 and 2, same patterns.
d. **assembly** — every prediction (the images, float32, channel-last) of every subject, slice-wise along axis 0 and
   patch-wise with ``ignore_incomplete=False``, through ``client.assembler`` vs pymia's ``SubjectAssembler``; three
   times for patchwire: a server with ``--state-dir`` (every batch journalled and fsync'ed before its
   acknowledgement) and one without (jobs in memory, like pymia's; the target uses this one), both as a client on
   their host uses them by default (payloads through shared memory), and the one without over the wire
   (``shared_memory=False``), as a client on another host would.
e. **time to first batch** (iterator created -> first batch) and **peak RSS** of the server (``VmHWM`` of the
   subprocess, reset per pattern through ``/proc/PID/clear_refs``) and of this client process.

Streaming patterns run for a time budget (several epochs if one is short, a new iterator per epoch), not a fixed
epoch count. Throughput counts the bytes of the tensors delivered (images, labels, sample indices). MB = 10^6 bytes,
GB = 10^9 bytes. Targets are ratios within the run; a missed target is reported, never an error.

Writes ``DIR/bench.json``, ``DIR/bench.png`` and ``DIR/bench.txt`` (the printed table); ``DIR/logs/`` holds the
servers' stderr. Full mode generates 8 phantom subjects of 181x217x181 once (cached in ``$PATCHWIRE_HOME`` if set,
else in DIR); ``--smoke`` uses 2 tiny subjects and short budgets (well under a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import torch.utils.data as torch_data

import patchwire.client as pw
from patchwire.client import extraction as pw_extr
from patchwire.client._datasource import PREFETCH_MESSAGES
from patchwire.client.torch import PytorchStreamingDataset
from patchwire.service._phantom import make_phantom_dataset
from patchwire.wire import framing
from patchwire.wire.malloc import tune_client_process

HERE = Path(__file__).resolve().parent
BATCH_SIZE = 16
DATASET = "bench"
CATEGORIES = ("images", "labels")
PREDICTION_KEY = "__prediction"  # pymia's key for a plain-array prediction (patchwire keeps it)
MB = 1e6
CEILING_METHOD = "/patchwire.bench.Ceiling/Stream"
CEILING_MESSAGE_BYTES = 1 << 20
DATA_VERSION = "v1"  # bump when the phantom generator's output changes


@dataclass(frozen=True)
class Mode:
    """What one run measures and how long."""

    name: str
    subjects: int
    shape: tuple[int, int, int]
    patch: int
    budget_s: float
    """Wall-clock budget per streaming pattern and loader (several epochs when one is shorter), after the warm-up."""
    warmup_s: float
    """Most time a loader warms up (its first epoch, or until this many seconds when the epoch is longer): caches
    filled, copies built, workers started. Throughput counts from there; the time to first batch is the warm-up's."""
    max_samples: int
    """Stop a pattern after this many samples even inside its budget."""
    ceiling_messages: int
    ceiling_runs: int
    assembly_runs: int
    """Runs of each assembler per case, interleaved (patchwire's three, then pymia, again): the median counts."""


FULL = Mode("full", 8, (181, 217, 181), 64, 10.0, 2.0, 200_000, 1024, 5, 5)
SMOKE = Mode("smoke", 2, (24, 40, 36), 16, 0.3, 0.1, 2_000, 64, 3, 1)

# The performance targets, as (ratio or bound).
#: patchwire's assembly runs: name -> (label, server, the assembler's shared_memory). Servers: "durable" has a state
#: folder (journalled, fsync'ed), "in_memory" none (jobs in memory, like pymia's).
ASSEMBLERS: dict[str, tuple[str, str, bool | None]] = {
    "patchwire": ("patchwire, state dir", "durable", None),
    "patchwire_in_memory": ("patchwire, in memory", "in_memory", None),
    "patchwire_in_memory_wire": ("patchwire, in memory, wire", "in_memory", False),
}
#: Unacknowledged prediction batches patchwire's assembler may have in flight (RemoteSubjectAssembler window).
ASSEMBLY_WINDOW = 8
#: Stand-in training steps per batch for the prefetch measurement, by pattern: about as long as receiving a batch.
TRAINING_STEP_MS = {"axial": 4.0, "patches": 30.0}
#: Size of one durable append in the disk measurement: about one batch of 16 axial slice predictions.
DISK_APPEND_BYTES = 4 << 20
TARGET_VS_CEILING = 0.7
TARGET_AXIAL_VS_PYMIA_W2 = 1.0
TARGET_AXIS2_VS_PYMIA = 10.0
TARGET_PATCH_VS_PYMIA = 1.5
TARGET_ASSEMBLY_VS_PYMIA = 1.0
TARGET_TTFB_MS = 150.0
TARGET_SERVER_RSS_MB = 400.0  # + the server's configured block cache


# -- pymia: the tests' oracle module holds the one numpy-alias shim pymia 0.3.4 needs ------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _pymia_oracle import load_pymia  # noqa: E402


def load_pymia_torch() -> Any:
    load_pymia()
    import pymia.data.backends.pytorch

    return pymia.data.backends.pytorch


# -- processes and memory ---------------------------------------------------------------------------------------


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident set) of a process in MB, or None where /proc has no such field."""
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb * 1024 / MB


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Resets a process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


@contextlib.contextmanager
def subprocess_server(args: list[str], banner: str, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Starts ``args``, waits for its ``<banner> HOST:PORT`` line on stdout, yields (process, address); stderr goes to
    ``log``. The process is terminated on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env())
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith(banner):
                proc.kill()
                proc.wait(timeout=30)
                raise RuntimeError(f"{args[1:4]} did not start: {line!r}; see {log}")
            yield proc, line.rsplit(" ", 1)[1].strip()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@contextlib.contextmanager
def patchwire_server(
    data: Path, state_dir: Path | None, log: Path, cache_mib: float | None = None, extra: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``patchwire serve`` on a free port; ``cache_mib`` sets ``--cache-mb`` (the CLI's MB are MiB); no
    ``state_dir``: assembly jobs in memory; ``extra``: more arguments (``--verify``)."""
    args = [sys.executable, "-m", "patchwire.service", "--log-level", "WARNING", "serve", *extra]
    args += ["--dataset", f"{DATASET}={data}", "--port", "0"]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    if cache_mib is not None:
        args += ["--cache-mb", f"{cache_mib:g}"]
    with subprocess_server(args, "patchwire listening on ", log) as server:
        yield server


# -- data ---------------------------------------------------------------------------------------------------------


def dataset_path(mode: Mode, out: Path) -> Path:
    z, y, x = mode.shape
    name = f"bench-phantom-{DATA_VERSION}-{mode.subjects}x{z}x{y}x{x}.h5"
    home = os.environ.get("PATCHWIRE_HOME")
    folder = Path(home) if home and mode.name == FULL.name else out
    return folder / name


def ensure_dataset(mode: Mode, out: Path) -> tuple[Path, float | None]:
    """The benchmark file (generated on first use, written to a temporary name and renamed into place); returns it
    and the seconds generation took (None when it was cached)."""
    path = dataset_path(mode, out)
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".h5.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        make_phantom_dataset(tmp_path, subjects=mode.subjects, shape=mode.shape)
        tmp_path.replace(path)
        os.sync()  # write the new file back now, not while the first sections are being timed
    finally:
        tmp_path.unlink(missing_ok=True)
    return path, time.perf_counter() - start


def server_default_cache_mib() -> float | None:
    """``patchwire serve``'s default ``--cache-mb`` (None where this version has no block cache)."""
    from patchwire.service._cli import _parser

    return getattr(_parser().parse_args(["serve"]), "cache_mb", None)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# -- machine ------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = _status_kb_meminfo("MemTotal")
    import h5py

    try:
        pymia_version = __import__("importlib.metadata").metadata.version("pymia")
    except Exception:
        pymia_version = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": None if mem_kb is None else round(mem_kb / (1 << 20), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "h5py": h5py.__version__,
        "pymia": pymia_version,
    }


def _status_kb_meminfo(field: str) -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


# -- a. ceiling ---------------------------------------------------------------------------------------------------


def bench_ceiling(mode: Mode, logs: Path) -> dict[str, Any]:
    args = [sys.executable, str(HERE / "ceiling_server.py")]
    with subprocess_server(args, "ceiling listening on ", logs / "ceiling-server.log") as (proc, address):
        channel = grpc.insecure_channel(address, options=framing.channel_options())
        try:
            stream = channel.unary_stream(CEILING_METHOD, _registered_method=False)
            request = f"{mode.ceiling_messages},{CEILING_MESSAGE_BYTES}".encode()
            for _ in stream(b"4,1048576", wait_for_ready=True, timeout=30):  # connect, warm up
                pass
            runs = []
            for _ in range(mode.ceiling_runs):
                start = time.perf_counter()
                received = sum(len(message) for message in stream(request, timeout=300))
                runs.append(received / (time.perf_counter() - start))
        finally:
            channel.close()
        server_peak = peak_rss_mb(proc.pid)
    return {"runs_bytes_per_s": runs, "server_peak_rss_mb": server_peak}


def pooled_ceiling(mode: Mode, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The ceiling of the run: the median of the runs measured before patchwire's streaming and right after it, so
    that a drift of the machine's speed during the streaming does not skew the ratios against it."""
    runs = before["runs_bytes_per_s"] + after["runs_bytes_per_s"]
    bytes_per_s = statistics.median(runs)
    peaks = [p for p in (before["server_peak_rss_mb"], after["server_peak_rss_mb"]) if p is not None]
    return {
        "message_bytes": CEILING_MESSAGE_BYTES,
        "messages_per_run": mode.ceiling_messages,
        "runs_gb_per_s": [r / 1e9 for r in runs],
        "before_streaming_gb_per_s": statistics.median(before["runs_bytes_per_s"]) / 1e9,
        "after_streaming_gb_per_s": statistics.median(after["runs_bytes_per_s"]) / 1e9,
        "bytes_per_s": bytes_per_s,
        "gb_per_s": bytes_per_s / 1e9,
        "mb_per_s": bytes_per_s / MB,
        "server_peak_rss_mb": max(peaks, default=None),
    }


# -- b, c. streaming ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    key: str
    label: str
    kind: str  # "slice" | "patch"
    axis: int = 0
    patch: int = 0

    def patchwire_indexing(self) -> pw_extr.IndexingStrategy:
        if self.kind == "slice":
            return pw_extr.SliceIndexing(self.axis)
        return pw_extr.PatchWiseIndexing((self.patch,) * 3)

    def pymia_indexing(self) -> Any:
        extraction = load_pymia().extraction
        if self.kind == "slice":
            return extraction.SliceIndexing(self.axis)
        return extraction.PatchWiseIndexing((self.patch,) * 3)


def patterns(mode: Mode) -> list[Pattern]:
    p = mode.patch
    return [
        Pattern("axial", "axial slices (axis 0)", "slice", axis=0),
        Pattern("axis2", "axis-2 slices", "slice", axis=2),
        Pattern("patches", f"{p}^3 patches", "patch", patch=p),
    ]


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
    with server as (proc, address):
        server_rss["idle"] = peak_rss_mb(proc.pid)
        reset_ok = True
        with pw.connect(address) as client:
            for pattern in patterns(mode):
                reset_ok &= reset_peak_rss(proc.pid)
                ds = client.datasource(
                    DATASET,
                    pattern.patchwire_indexing(),
                    pw_extr.DataExtractor(CATEGORIES),
                    label_compression=label_compression,
                )
                stream = PytorchStreamingDataset(ds, batch_size=BATCH_SIZE, shuffle=True, seed=0)
                loader = torch_data.DataLoader(stream, batch_size=None, num_workers=0)

                def make_iterator(epoch: int, stream: Any = stream, loader: Any = loader) -> Iterator[Any]:
                    stream.set_epoch(epoch)
                    return iter(loader)

                result = measure_loader(make_iterator, mode)
                result["dataset_samples"] = len(ds)
                result["server_peak_rss_mb"] = server_rss[pattern.key] = peak_rss_mb(proc.pid)
                results[pattern.key] = result
                ds.close()
                _progress(f"patchwire ({tag}) {pattern.label}: {result['samples_per_s']:.0f} samples/s")
    return results, server_rss, reset_ok


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
            with server as (_, address), pw.connect(address) as client:
                start_s = time.perf_counter() - started
                ds = client.datasource(DATASET, axial.patchwire_indexing(), pw_extr.DataExtractor(CATEGORIES))
                stream = PytorchStreamingDataset(ds, batch_size=BATCH_SIZE, shuffle=True, seed=0)
                loader = torch_data.DataLoader(stream, batch_size=None, num_workers=0)

                def make_iterator(epoch: int, stream: Any = stream, loader: Any = loader) -> Iterator[Any]:
                    stream.set_epoch(epoch)
                    return iter(loader)

                results[key] = measure_loader(make_iterator, mode) | {"server_start_s": start_s}
                ds.close()
            _progress(f"patchwire {axial.label}, {key}: {results[key]['samples_per_s']:.0f} samples/s")
    return results


def bench_training_step(mode: Mode, data: Path, work: Path, logs: Path) -> dict[str, Any]:
    """Streaming with a training step between batches (``TRAINING_STEP_MS`` per pattern), with the client's
    prefetch thread (the default) and without it: how much of the step the stream hides."""
    results: dict[str, Any] = {}
    server = patchwire_server(data, work / "state-step", logs / "server-step.log")
    with server as (_, address), pw.connect(address) as client:
        for pattern in patterns(mode):
            if pattern.key not in TRAINING_STEP_MS:
                continue
            step_ms = TRAINING_STEP_MS[pattern.key]
            ds = client.datasource(DATASET, pattern.patchwire_indexing(), pw_extr.DataExtractor(CATEGORIES))
            results[pattern.key] = {"step_ms": step_ms}
            for prefetch in (PREFETCH_MESSAGES, 0):
                stream = PytorchStreamingDataset(ds, batch_size=BATCH_SIZE, shuffle=True, seed=0, prefetch=prefetch)
                loader = torch_data.DataLoader(stream, batch_size=None, num_workers=0)

                def make_iterator(epoch: int, stream: Any = stream, loader: Any = loader) -> Iterator[Any]:
                    stream.set_epoch(epoch)
                    return iter(loader)

                result = measure_loader(make_iterator, mode, step_ms / 1e3)
                results[pattern.key][f"prefetch{prefetch}"] = result
                _progress(
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
            _progress(f"pymia {pattern.label} workers={workers}: {result['samples_per_s']:.0f} samples/s")
    return results


# -- d. assembly --------------------------------------------------------------------------------------------------


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
    p = mode.patch
    cases = [
        ("slice", "slice-wise (axis 0)", pm.extraction.SliceIndexing(0), pw_extr.SliceIndexing(0)),
        (
            "patch",
            f"patch-wise {p}^3 (incomplete kept)",
            pm.extraction.PatchWiseIndexing((p,) * 3, ignore_incomplete=False),
            pw_extr.PatchWiseIndexing((p,) * 3, ignore_incomplete=False),
        ),
    ]
    results: dict[str, Any] = {}
    server_rss: dict[str, float | None] = {}
    image_extractor = pm.extraction.DataExtractor(categories=("images",))
    whole = pm.extraction.PymiaDatasource(str(data), None, image_extractor)
    images = [whole.direct_extract(image_extractor, s)["images"] for s in range(len(whole.get_subjects()))]
    whole.close_reader()
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
                    proc, address = servers[server]
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
            _progress(
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


# -- targets, table, plot -----------------------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, threshold: float, unit: str) -> None:
        passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out.append({"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "passed": passed})

    ceiling = report["ceiling"]["bytes_per_s"]
    cache_mb = report["server"]["small_cache_bytes"] / MB
    pw_res, pymia = report["patchwire"], report["pymia"]
    labels = {p.key: p.label for p in patterns(report["_mode"])}
    for key, result in pw_res.items():
        add(
            f"{labels[key]}: patchwire / ceiling (bytes/s)",
            result["bytes_per_s"] / ceiling,
            ">=",
            TARGET_VS_CEILING,
            "x",
        )
    add(
        f"{labels['axial']}: patchwire / pymia w=2 (samples/s)",
        pw_res["axial"]["samples_per_s"] / pymia["axial"]["workers2"]["samples_per_s"],
        ">=",
        TARGET_AXIAL_VS_PYMIA_W2,
        "x",
    )
    for workers in (0, 2):
        add(
            f"{labels['axis2']}: patchwire / pymia w={workers} (samples/s)",
            pw_res["axis2"]["samples_per_s"] / pymia["axis2"][f"workers{workers}"]["samples_per_s"],
            ">=",
            TARGET_AXIS2_VS_PYMIA,
            "x",
        )
    best_pymia_patch = max(pymia["patches"][w]["samples_per_s"] for w in ("workers0", "workers2"))
    add(
        f"{labels['patches']}: patchwire / best pymia (samples/s)",
        pw_res["patches"]["samples_per_s"] / best_pymia_patch,
        ">=",
        TARGET_PATCH_VS_PYMIA,
        "x",
    )
    for result in report["assembly"].values():  # like for like: pymia's assembler keeps everything in memory too
        add(
            f"assembly {result['label']}: in memory / pymia",
            result["patchwire_in_memory"]["subjects_per_s"] / result["pymia"]["subjects_per_s"],
            ">=",
            TARGET_ASSEMBLY_VS_PYMIA,
            "x",
        )
    for key, ms in report["ttfb"]["patchwire_ms"].items():
        add(f"{labels[key]}: patchwire time to first batch", ms, "<=", TARGET_TTFB_MS, "ms")
    add(
        f"server peak RSS, dataset > cache (400 MB + {cache_mb:.0f} MB cache)",
        report["rss"]["server_streaming_peak_mb"],
        "<=",
        TARGET_SERVER_RSS_MB + cache_mb,
        "MB",
    )
    return out


def format_table(report: dict[str, Any]) -> str:
    m, d = report["machine"], report["data"]
    mode: Mode = report["_mode"]
    lines = [
        f"patchwire benchmark ({mode.name}), {report['date']}",
        f"machine: {m['cpu']}, {m['cores_usable']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"numpy {m['numpy']}, torch {m['torch']}, grpcio {m['grpcio']}, h5py {m['h5py']}, pymia {m['pymia']}",
        f"data: {d['subjects']} subjects of {'x'.join(map(str, d['shape']))}, T1/T2 float32 + labels uint8, "
        f"{d['file_mb']:.0f} MB; batch {BATCH_SIZE}, shuffled; {mode.budget_s:g} s per loader after its warm-up (first "
        f"epoch, at most {mode.warmup_s:g} s; time to first batch is the warm-up's); MB = 10^6 bytes",
        f"patchwire serve block cache: the default --cache-mb {report['server']['default_cache_mib']} MiB (dataset "
        f"fits), and a small one, --cache-mb {report['server']['small_cache_mib']:g} MiB (dataset larger); "
        "throughput targets use the default",
        "",
    ]
    c = report["ceiling"]
    lines.append(
        f"ceiling: raw gRPC streaming of 1 MiB bytes messages: {c['gb_per_s']:.2f} GB/s (median of "
        f"{len(c['runs_gb_per_s'])} x {c['messages_per_run']} messages: half before patchwire's streaming, "
        f"{c['before_streaming_gb_per_s']:.2f} GB/s, half after it, {c['after_streaming_gb_per_s']:.2f} GB/s)"
    )
    lines.append("")
    header = f"{'pattern':<24} {'loader':<22} {'samples/s':>10} {'MB/s':>9} {'x ceiling':>10} {'TTFB ms':>9}"
    header += f" {'server RSS MB':>14}"
    lines += [header, "-" * len(header)]
    for p in patterns(mode):
        rows = [
            ("patchwire", report["patchwire"][p.key]),
            ("patchwire small cache", report["patchwire_small_cache"][p.key]),
            ("patchwire lz4 labels", report["patchwire_lz4_labels"][p.key]),
        ]
        rows += [(f"pymia w={w}", report["pymia"][p.key][f"workers{w}"]) for w in (0, 2)]
        for name, r in rows:
            rss = r.get("server_peak_rss_mb")
            lines.append(
                f"{p.label:<24} {name:<22} {r['samples_per_s']:>10.0f} {r['mb_per_s']:>9.0f} "
                f"{r['bytes_per_s'] / c['bytes_per_s']:>9.2f}x {r['ttfb_ms']:>9.1f} "
                f"{'' if rss is None else f'{rss:.0f}':>14}"
            )
    lines.append("")
    header = f"{'axial slices, patchwire serve --verify':<40} {'plain':>9} {'verify':>9} {'ratio':>7} {'start s':>13}"
    lines += [header, "-" * len(header)]
    for cache_key, shown in (("default_cache", "default cache"), ("small_cache", "small cache")):
        plain, verified = report["verify"][cache_key], report["verify"][f"{cache_key}_verify"]
        lines.append(
            f"{shown + ', samples/s':<40} {plain['samples_per_s']:>9.0f} {verified['samples_per_s']:>9.0f} "
            f"{verified['samples_per_s'] / plain['samples_per_s']:>6.2f}x "
            f"{plain['server_start_s']:>6.2f}/{verified['server_start_s']:<6.2f}"
        )
    lines.append("")
    labels = {p.key: p.label for p in patterns(mode)}
    header = f"{'with a training step (sleep) per batch':<40} {'step ms':>8} {'prefetch':>9} {'none':>9} {'gain':>7}"
    lines += [header, "-" * len(header)]
    for key, r in report["training_step"].items():
        with_pf, without = r[f"prefetch{PREFETCH_MESSAGES}"]["samples_per_s"], r["prefetch0"]["samples_per_s"]
        lines.append(
            f"{labels[key] + ', samples/s':<40} {r['step_ms']:>8g} {with_pf:>9.0f} {without:>9.0f} "
            f"{with_pf / without:>6.2f}x"
        )
    lines.append("")
    header = (
        f"{'assembly':<36} {'assembler':<28} {'subjects/s':>10} {'MB/s':>9} {'seconds':>8} {'x pymia':>8} "
        f"{'verified':>9}"
    )
    lines += [header, "-" * len(header)]
    names = {name: shown for name, (shown, _, _) in ASSEMBLERS.items()} | {"pymia": "pymia"}
    for result in report["assembly"].values():
        for name, shown in names.items():
            r = result[name]
            lines.append(
                f"{result['label']:<36} {shown:<28} {r['subjects_per_s']:>10.2f} {r['mb_per_s']:>9.0f} "
                f"{r['seconds']:>8.2f} {r['subjects_per_s'] / result['pymia']['subjects_per_s']:>7.2f}x "
                f"{'yes' if r['verified'] else 'NO':>9}"
            )
    disk = report["durable_writes"]
    lines += [
        "assembly context: with a state dir every batch is journalled and fsync'ed before it is acknowledged, and each",
        "  prediction byte is written twice (journal, finished volume): durable appends on this disk "
        f"{disk['mb_per_s']:.0f} MB/s ({disk['append_bytes'] >> 20} MiB,",
        f"  fsync each), so about {disk['mb_per_s'] / 2:.0f} MB/s; without one, jobs live in memory like pymia's.",
        "  On the server's host payloads go through shared memory (the first two patchwire rows). Over the wire",
        f"  posting and fetching back cross it twice: <= {c['bytes_per_s'] / 2 / MB:.0f} MB/s. Seconds: the median of "
        f"{report['_mode'].assembly_runs} interleaved run(s) of each",
        "  assembler; every run's are in the JSON (runs_seconds).",
    ]
    rss = report["rss"]
    lines.append("")
    lines.append("server peak RSS MB (VmHWM, reset per pattern):")
    for group, peaks in rss["server_peak_mb"].items():
        if isinstance(peaks, dict):
            lines.append(f"  {group}: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v is not None))
        elif peaks is not None:
            lines.append(f"  {group}: {peaks:.0f}")
    client = ", ".join(f"{k} {v:.0f}" for k, v in rss["client_peak_mb"].items() if v is not None)
    lines.append(f"client peak RSS MB: {client}; whole run (getrusage) {rss['client_maxrss_mb']:.0f}")
    lines.append("")
    header = f"{'target':<66} {'value':>9} {'target':>10} {'result':>7}"
    lines += [header, "-" * len(header)]
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}{t['unit'] if t['unit'] == 'x' else ''}"
        if t["unit"] != "x" and t["value"] is not None:
            value = f"{t['value']:.0f} {t['unit']}"
        bound = f"{t['op']} {t['threshold']:.4g}{t['unit'] if t['unit'] == 'x' else ' ' + t['unit']}"
        lines.append(f"{t['name']:<66} {value:>9} {bound:>10} {'PASS' if t['passed'] else 'FAIL':>7}")
    passed = sum(t["passed"] for t in report["targets"])
    lines.append(f"{passed}/{len(report['targets'])} targets met")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode: Mode = report["_mode"]
    pats = patterns(mode)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 2, 2]})
    ceiling_mb = report["ceiling"]["mb_per_s"]

    ax = axes[0]
    small = f"patchwire, cache {report['server']['small_cache_mib']:g} MiB"
    loaders: list[tuple[str, str, Callable[[str], dict[str, Any]]]] = [
        ("patchwire", "#1f77b4", lambda key: report["patchwire"][key]),
        (small, "#9ecae1", lambda key: report["patchwire_small_cache"][key]),
        ("patchwire, lz4 labels", "#6baed6", lambda key: report["patchwire_lz4_labels"][key]),
        ("pymia w=0", "#ff7f0e", lambda key: report["pymia"][key]["workers0"]),
        ("pymia w=2", "#2ca02c", lambda key: report["pymia"][key]["workers2"]),
    ]
    width = 0.16
    offset = (len(loaders) - 1) / 2
    for j, (name, color, result) in enumerate(loaders):
        values = [result(p.key)["mb_per_s"] for p in pats]
        ax.bar([i + (j - offset) * width for i in range(len(pats))], values, width, label=name, color=color)
    ax.axhline(ceiling_mb, color="k", linestyle="--", linewidth=1, label=f"gRPC ceiling {ceiling_mb:.0f} MB/s")
    ax.axhline(0.7 * ceiling_mb, color="grey", linestyle=":", linewidth=1, label="0.7x ceiling (target)")
    ax.set_yscale("log")
    ax.set_ylim(top=ceiling_mb * 12)  # room for the legend above the ceiling line
    ax.set_xticks(range(len(pats)), [p.label for p in pats])
    ax.set_ylabel("MB/s delivered to torch (log)")
    ax.set_title("streaming, batch 16, shuffled")
    ax.legend(fontsize=7, loc="upper center", ncol=3)

    ax = axes[1]
    cases = list(report["assembly"].values())
    colors = ["#1f77b4", "#aec7e8", "#9edae5"]
    bars = [(name, shown, colors[j]) for j, (name, (shown, _, _)) in enumerate(ASSEMBLERS.items())]
    bars.append(("pymia", "pymia", "#ff7f0e"))
    width = 0.8 / len(bars)
    for j, (name, label, color) in enumerate(bars):
        values = [c[name]["mb_per_s"] for c in cases]
        offset = (j - (len(bars) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(cases))], values, width, label=label, color=color)
    ax.set_xticks(range(len(cases)), [c["label"] for c in cases], fontsize=8)
    ax.set_ylabel("MB/s of predictions")
    ax.set_title("assembly of whole subjects")
    ax.legend(fontsize=8)

    ax = axes[2]
    for j, (name, color, result) in enumerate(loaders):
        values = [result(p.key)["ttfb_ms"] for p in pats]
        ax.bar([i + (j - offset) * width for i in range(len(pats))], values, width, label=name, color=color)
    ax.axhline(TARGET_TTFB_MS, color="grey", linestyle=":", linewidth=1, label=f"{TARGET_TTFB_MS:g} ms (target)")
    ax.set_xticks(range(len(pats)), [p.label for p in pats], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("time to first batch")
    ax.legend(fontsize=7)

    m = report["machine"]
    fig.suptitle(f"patchwire benchmark ({mode.name}) - {m['cpu']}, {m['cores_usable']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _jsonable(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    out["mode"] = asdict(report["_mode"])
    return out


def run(mode: Mode, out: Path, cache_mib: float | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    tune_client_process()  # what patchwire's client does on connecting; the raw ceiling client needs it too
    client_peak: dict[str, float | None] = {}
    report: dict[str, Any] = {
        "_mode": mode,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
    }
    data, generated_s = ensure_dataset(mode, out)
    warm_page_cache(data)
    report["data"] = {
        "path": str(data),
        "subjects": mode.subjects,
        "shape": list(mode.shape),
        "file_mb": data.stat().st_size / MB,
        "generated_s": generated_s,
    }
    if cache_mib is None:  # the RSS target is about a dataset larger than the cache: give it half the file
        cache_mib = round(data.stat().st_size / 2 / (1 << 20), 2)
    report["server"] = {
        "default_cache_mib": server_default_cache_mib(),
        "small_cache_mib": cache_mib,
        "small_cache_bytes": int(cache_mib * (1 << 20)),
    }
    _progress(f"data {data} ({report['data']['file_mb']:.0f} MB), small server block cache {cache_mib:g} MiB")
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-") as tmp:
        work = Path(tmp)

        reset_peak_rss()
        ceiling_before = bench_ceiling(mode, logs)
        client_peak["ceiling"] = peak_rss_mb()
        _progress(f"ceiling {statistics.median(ceiling_before['runs_bytes_per_s']) / 1e9:.2f} GB/s")

        reset_peak_rss()
        report["patchwire"], stream_rss, reset_ok = bench_patchwire_streaming(
            mode, data, work, logs, None, "default cache", None
        )
        report["patchwire_small_cache"], small_rss, small_reset_ok = bench_patchwire_streaming(
            mode, data, work, logs, cache_mib, "small cache", None
        )
        report["patchwire_lz4_labels"], _, _ = bench_patchwire_streaming(
            mode, data, work, logs, None, "lz4 labels", "lz4"
        )
        report["training_step"] = bench_training_step(mode, data, work, logs)
        report["verify"] = bench_verify(mode, data, work, logs, cache_mib)
        client_peak["patchwire_streaming"] = peak_rss_mb()
        report["ceiling"] = pooled_ceiling(mode, ceiling_before, bench_ceiling(mode, logs))
        _progress(f"ceiling again {report['ceiling']['after_streaming_gb_per_s']:.2f} GB/s")

        reset_peak_rss()
        report["pymia"] = bench_pymia_streaming(mode, data)
        client_peak["pymia_streaming"] = peak_rss_mb()

        report["durable_writes"] = bench_durable_writes(mode, work)
        _progress(f"durable writes {report['durable_writes']['mb_per_s']:.0f} MB/s")
        reset_peak_rss()
        report["assembly"], assembly_rss = bench_assembly(mode, data, work, logs)
        client_peak["assembly"] = peak_rss_mb()

    report["ttfb"] = {
        "patchwire_ms": {k: r["ttfb_ms"] for k, r in report["patchwire"].items()},
        "pymia_ms": {k: {w: r[w]["ttfb_ms"] for w in r} for k, r in report["pymia"].items()},
    }

    def streaming_peak(peaks: dict[str, float | None]) -> float | None:
        values = [v for k, v in peaks.items() if k != "idle" and v is not None]
        return max(values) if values else None

    report["rss"] = {
        "server_peak_mb": {
            "ceiling_server": report["ceiling"]["server_peak_rss_mb"],
            "streaming, default cache": stream_rss,
            "streaming, small cache": small_rss,
            "assembly": assembly_rss,
        },
        "server_streaming_peak_mb": streaming_peak(small_rss),
        "server_streaming_peak_mb_default_cache": streaming_peak(stream_rss),
        "server_peak_reset_per_pattern": reset_ok and small_reset_ok,
        "client_peak_mb": client_peak,
        "client_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
    }
    report["targets"] = targets(report)
    return report


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="tiny data and budgets: proves the harness works")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default benchmarks/results)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per streaming loader (default by mode)")
    parser.add_argument(
        "--cache-mb",
        type=float,
        default=None,
        help="the streaming server's --cache-mb (MiB; default half the dataset file, so the dataset is larger)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    mode = SMOKE if args.smoke else FULL
    if args.budget is not None:
        mode = dataclasses.replace(mode, budget_s=args.budget)
    start = time.perf_counter()
    report = run(mode, args.out, args.cache_mb)
    report["wall_s"] = time.perf_counter() - start
    table = format_table(report)
    print(table, flush=True)
    (args.out / "bench.txt").write_text(table + "\n")
    (args.out / "bench.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    plot(report, args.out / "bench.png")
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.png'} ({report['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
