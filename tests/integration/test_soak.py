"""Soak: streaming clients and posting clients against one ``patchwire serve`` for a while.

Streaming clients read shuffled epochs of two datasets and check every sample against a direct read of the HDF5
file; posting clients run assembly jobs one after another (both datasets, ``overwrite`` and ``average``, window 1
and 4, shared memory and the wire), check every volume exactly, and delete the job. The server's resident memory
(VmRSS) is sampled throughout: after a warm-up it must stay flat. Zero errors, every volume exact.

Short by default (``SOAK_SECONDS``, 15 s of load: CI runs it); ``PATCHWIRE_SOAK_S=300`` (or ``scripts/soak.sh``) runs
the long mode. Select it with ``-m soak``. The figures are printed (run with ``-s``) and, with
``PATCHWIRE_SOAK_REPORT=path.json``, written there.

The server speaks TLS and requires tokens, as one put on a network would; how it is started and how clients connect
comes from :func:`soak_endpoint` alone.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.cli import main
from patchwire.client import extraction as extr

from _servers import serve_process

SOAK_SECONDS = 15.0
DURATION_S = float(os.environ.get("PATCHWIRE_SOAK_S", SOAK_SECONDS))
WARMUP_S = min(0.4 * DURATION_S, 60.0)
RSS_INTERVAL_S = 0.5
RSS_GROWTH_MAX_MIB = 16  # after warm-up: allocator noise and gRPC buffers, not a leak that grows with work
STREAMERS = 2
POSTERS = 2
BATCH = 5
ENTRY = "seg"
CHANNELS = 2

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.timeout(DURATION_S * 3 + 120)]


@dataclass(frozen=True)
class SoakEndpoint:
    """How the soak's server is started and its clients connect."""

    server_args: tuple[str, ...] = ()
    """Extra ``patchwire serve`` arguments (e.g. certificate and token files)."""
    connect_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of every ``pw.connect`` (e.g. credentials)."""


def soak_endpoint(tmp_path: Path) -> SoakEndpoint:
    """The soak's server arguments and client connection arguments: TLS with the development set of ``patchwire
    certs`` (made in ``tmp_path``) and authentication on; every client is the ``writer`` identity (read, write)
    with its bearer token, as a training job on a shared server would be."""
    directory = tmp_path / "certs"
    assert main(["--log-level", "WARNING", "certs", str(directory)]) == 0
    return SoakEndpoint(
        server_args=(
            "--tls-cert",
            str(directory / "server.crt"),
            "--tls-key",
            str(directory / "server.key"),
            "--auth-config",
            str(directory / "auth.toml"),
        ),
        connect_kwargs={
            "token": (directory / "writer.token").read_text().strip(),
            "root_certificates": directory / "ca.crt",
        },
    )


@dataclass
class _Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    samples: int = 0
    sample_mismatches: int = 0
    volumes: int = 0
    volume_mismatches: int = 0
    jobs: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def _direct(path: Path) -> dict[str, list[np.ndarray]]:
    """Every subject's images and labels, read straight from the file (pymia's layout)."""
    with h5py.File(path, "r") as f:
        return {cat: [f[f"data/{cat}/{k}"][()] for k in range(len(f[f"data/{cat}"]))] for cat in ("images", "labels")}


def _where(ds: pw.RemoteDatasource) -> list[tuple[int, int]]:
    """(subject, slice) of each sample index of a SliceIndexing datasource."""
    return [(s.subject_index, i) for s in ds.subjects for i in range(s.sample_count)]


def _stream(
    address: str, endpoint: SoakEndpoint, c: int, files: Mapping[str, Path], stop: threading.Event, tally: _Tally
) -> None:
    direct = {name: _direct(path) for name, path in files.items()}
    with pw.connect(address, **endpoint.connect_kwargs) as client:
        sources = {
            name: client.datasource(name, extr.SliceIndexing(), extr.DataExtractor(categories=("images", "labels")))
            for name in files
        }
        try:
            for epoch in itertools.count():
                for name, ds in sources.items():
                    where = _where(ds)
                    for batch in ds.batches(batch_size=8, shuffle=True, seed=c, epoch=epoch):
                        bad = 0
                        for j, i in enumerate(batch["sample_index"]):
                            subject, z = where[int(i)]
                            for cat in ("images", "labels"):
                                bad += not np.array_equal(batch[cat][j], direct[name][cat][subject][z])
                        tally.add(samples=len(batch["sample_index"]), sample_mismatches=bad)
                        if stop.is_set():
                            return
        finally:
            for ds in sources.values():
                ds.close()


def _post(address: str, endpoint: SoakEndpoint, c: int, stop: threading.Event, tally: _Tally) -> None:
    shared = None if c % 2 == 0 else False  # one client through shared memory, one over the wire
    with pw.connect(address, **endpoint.connect_kwargs) as client:
        sources = {name: client.datasource(name, extr.SliceIndexing()) for name in ("tiny", "vary")}
        rng = np.random.default_rng(100 + c)
        base = {
            name: rng.standard_normal((len(ds), 24, 16, CHANNELS), dtype=np.float32) for name, ds in sources.items()
        }
        try:
            for n in itertools.count():
                if stop.is_set():
                    return
                name = ("tiny", "vary")[n % 2]
                ds = sources[name]
                predictions = base[name] + np.float32(n)
                with client.assembler(
                    ds,
                    ("overwrite", "average")[(n // 2) % 2],
                    job_id=f"soak-{c}-{n}",
                    entries={ENTRY: CHANNELS},
                    window=(1, 4)[(n // 4) % 2],
                    shared_memory=shared,
                ) as assembler:
                    order = [int(i) for i in rng.permutation(len(ds))]
                    for k in range(0, len(order), BATCH):
                        indices = order[k : k + BATCH]
                        assembler.add_batch({ENTRY: predictions[indices]}, indices)
                    assembler.flush()
                    status = assembler.status()
                    bad = int((status.state, status.received) != ("completed", len(ds)))
                    for s in ds.subjects:
                        volume = assembler.get_assembled_subject(s.subject_index)[ENTRY]
                        expected = predictions[s.first_sample_index : s.first_sample_index + s.sample_count]
                        bad += not (volume.dtype == expected.dtype and np.array_equal(volume, expected))
                    assembler.delete()
                tally.add(jobs=1, volumes=len(ds.subjects), volume_mismatches=bad)
        finally:
            for ds in sources.values():
                ds.close()


def _vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _sample_rss(pid: int, started: float, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    while True:
        out.append((time.monotonic() - started, _vm_rss_mib(pid)))
        if stop.wait(RSS_INTERVAL_S):  # the sampling period; stop ends it
            out.append((time.monotonic() - started, _vm_rss_mib(pid)))
            return


@pytest.fixture
def soak_files(tiny_h5: Path, vary_h5: Path) -> Iterator[dict[str, Path]]:
    yield {"tiny": tiny_h5, "vary": vary_h5}


def test_soak(soak_files: dict[str, Path], tmp_path: Path) -> None:
    endpoint = soak_endpoint(tmp_path)
    args = ("--state-dir", str(tmp_path / "state"), *endpoint.server_args)
    tally = _Tally()
    rss: list[tuple[float, float]] = []
    stop, rss_stop = threading.Event(), threading.Event()
    with serve_process(soak_files, args) as (proc, address):
        started = time.monotonic()
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, started, rss_stop, rss), daemon=True)
        sampler.start()
        workers: list[threading.Thread] = []

        def spawn(target: Callable[..., None], *a: Any) -> None:
            def run() -> None:
                try:
                    target(*a)
                except BaseException as exc:
                    with tally.lock:
                        tally.errors.append(f"{target.__name__}: {type(exc).__name__}: {exc}")
                    stop.set()  # the first error ends the run

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            workers.append(thread)

        for c in range(STREAMERS):
            spawn(_stream, address, endpoint, c, soak_files, stop, tally)
        for c in range(POSTERS):
            spawn(_post, address, endpoint, c, stop, tally)
        stop.wait(DURATION_S)  # the run's length: the workers stop at the end of it (or at the first error)
        stop.set()
        for thread in workers:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a soak client did not stop"
        elapsed = time.monotonic() - started
        rss_stop.set()
        sampler.join(timeout=30)
        assert proc.poll() is None, "the server died during the soak"

    after = [m for t, m in rss if t >= WARMUP_S]
    warm = after[0]
    report = {
        "seconds": round(elapsed, 1),
        "samples": tally.samples,
        "samples_per_s": round(tally.samples / elapsed, 1),
        "jobs": tally.jobs,
        "volumes": tally.volumes,
        "errors": len(tally.errors),
        "sample_mismatches": tally.sample_mismatches,
        "volume_mismatches": tally.volume_mismatches,
        "rss_mib_start": round(rss[0][1], 1),
        "rss_mib_after_warmup": round(warm, 1),
        "rss_mib_max_after_warmup": round(max(after), 1),
        "rss_mib_end": round(rss[-1][1], 1),
        "warmup_s": WARMUP_S,
    }
    print("soak:", json.dumps(report))
    if os.environ.get("PATCHWIRE_SOAK_REPORT"):
        Path(os.environ["PATCHWIRE_SOAK_REPORT"]).write_text(json.dumps({**report, "rss_mib": rss}, indent=1))
    assert tally.errors == []
    assert tally.samples > 0 and tally.sample_mismatches == 0
    assert tally.volumes > 0 and tally.volume_mismatches == 0
    assert max(after) - warm <= RSS_GROWTH_MAX_MIB, report
