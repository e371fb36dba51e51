"""patchwire's benchmark: the gRPC ceiling, patchwire streaming, pymia 0.3.4 locally and assembly, in one run.

Usage::

    .venv/bin/python benchmarks/bench.py [--smoke] [--out DIR] [--budget SECONDS] [--cache-mb MB] [--only link]
        [--link-rate RATE]

Sections (each measured on the same generated pymia-format file, page cache warm):

a. **ceiling** — raw gRPC server streaming of 1 MiB ``bytes`` messages over loopback; the server
   (``benchmarks/ceiling_server.py``) runs in a subprocess, the client here, both with patchwire's process settings
   (the allocator thresholds of ``patchwire.wire.malloc``, ``framing.channel_options()``). Measured before patchwire's
   streaming and again right after it; the median of all those runs is the run's ceiling.
b. **patchwire** — ``patchwire serve`` in a subprocess; here ``PytorchStreamingDataset(ds, batch_size=16,
   shuffle=True, seed=0)`` in ``DataLoader(batch_size=None, num_workers=0)`` for axial slices, axis-2 slices and
   cubic patches, each with ``DataExtractor(categories=('images', 'labels'))`` and the client's defaults: with the
   server's default block cache (the dataset fits; the throughput targets use these runs) and with the default cache
   and ``label_compression='lz4'`` (what LZ4 label maps cost or bring here), twice each, in the order default, lz4,
   lz4, default (the machine's speed drifts within a run; the means count), and once with ``--cache-mb`` (default
   half the dataset file, so the dataset is larger than the cache; the RSS target uses this run).
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
e. **seed loop** — pymia's example loop with only the construction lines changed (``DataExtractor(images, labels)``,
   ``Permute``, map-style ``PytorchDatasetAdapter``, ``DataLoader(batch_size=2)``), pymia locally vs patchwire, for
   axial slices and patches, shuffle off and on, ``num_workers`` 0 and 2 (``benchmarks/_seed_loop.py``).
g. **random patches for training** (``benchmarks/_sampling.py``): label-balanced random patches sampled (and
   augmented) on the server vs TorchIO's ``Queue`` + ``LabelSampler`` and pymia's grid patches with its augmentation,
   locally; samples per server CPU-second.
g. **random patches for training** (``benchmarks/_sampling.py``): label-balanced random patches sampled (and
   augmented) on the server vs TorchIO's ``Queue`` + ``LabelSampler`` and pymia's grid patches with its augmentation,
   locally; samples per server CPU-second.
h. **time to first batch** (iterator created -> first batch) and **peak RSS** of the server (``VmHWM`` of the
   subprocess, reset per pattern through ``/proc/PID/clear_refs``) and of this client process.
i. **link** (``benchmarks/_link.py``): the ceiling, streaming and assembly over a loopback limited to 10 Gbit/s in a
   network namespace (shared memory off), uncompressed and compressed, on skull-stripped data; and streaming over
   plain loopback with compression off and on. Needs root and iproute2, else it is skipped and the table says why;
   ``--only link`` runs this section alone (``link.png`` beside the other outputs), ``--link-rate 1gbit`` limits the
   link to another rate (``tc``'s units; default 10gbit).
j. **every core** (``benchmarks/_scaling.py``): aggregate streaming throughput of ``patchwire serve --workers N``
   with N client processes (one channel each, one per worker), N = 1, 2, 4, ... up to the usable cores
   (``PATCHWIRE_BENCH_WORKERS=1,2,4,8`` chooses; smoke mode 1 and 2); ``python benchmarks/_scaling.py --workers
   LIST`` runs it alone.

Streaming patterns run for a time budget (several epochs if one is short, a new iterator per epoch), not a fixed
epoch count. Throughput counts the bytes of the tensors delivered (images, labels, sample indices). MB = 10^6 bytes,
GB = 10^9 bytes. Targets are ratios within the run; a missed target is reported, never an error.

Writes ``DIR/bench.json``, ``DIR/bench.png`` and ``DIR/bench.txt`` (the printed table); ``DIR/logs/`` holds the
servers' stderr. Full mode generates 8 phantom subjects of 181x217x181 once (cached in ``$PATCHWIRE_HOME`` if set,
else in DIR); ``--smoke`` uses 2 tiny subjects and short budgets (well under a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _assembly import bench_assembly, bench_durable_writes
from _ceiling import bench_ceiling, pooled_ceiling
from _data import ensure_dataset, warm_page_cache
from _link import LINK_RATE, bench_link, link_lines, link_targets, plot_link
from _machine import machine_info, peak_rss_mb, reset_peak_rss
from _plan import FULL, HERE, MB, SMOKE, Mode, progress
from _plot import plot
from _report import format_table, targets
from _sampling import bench_sampling
from _scaling import bench_scaling
from _seed_loop import bench_seed_loop
from _streaming import (
    bench_default_and_lz4,
    bench_patchwire_streaming,
    bench_pymia_streaming,
    bench_training_step,
    bench_verify,
)

from patchwire.cli.serve import DEFAULT_CACHE_MB
from patchwire.wire.malloc import tune_client_process


def _jsonable(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    out["mode"] = asdict(report["_mode"])
    return out


def run(mode: Mode, out: Path, cache_mib: float | None = None, link_rate: str = LINK_RATE) -> dict[str, Any]:
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
        "default_cache_mib": DEFAULT_CACHE_MB,
        "small_cache_mib": cache_mib,
        "small_cache_bytes": int(cache_mib * (1 << 20)),
    }
    progress(f"data {data} ({report['data']['file_mb']:.0f} MB), small server block cache {cache_mib:g} MiB")
    with tempfile.TemporaryDirectory(prefix="patchwire-bench-") as tmp:
        work = Path(tmp)

        reset_peak_rss()
        ceiling_before = bench_ceiling(mode, logs)
        client_peak["ceiling"] = peak_rss_mb()
        progress(f"ceiling {statistics.median(ceiling_before['runs_bytes_per_s']) / 1e9:.2f} GB/s")

        reset_peak_rss()
        report["patchwire"], stream_rss, reset_ok, report["patchwire_lz4_labels"] = bench_default_and_lz4(
            mode, data, work, logs
        )
        report["patchwire_small_cache"], small_rss, small_reset_ok = bench_patchwire_streaming(
            mode, data, work, logs, cache_mib, "small cache", None
        )
        report["training_step"] = bench_training_step(mode, data, work, logs)
        report["verify"] = bench_verify(mode, data, work, logs, cache_mib)
        client_peak["patchwire_streaming"] = peak_rss_mb()
        report["ceiling"] = pooled_ceiling(mode, ceiling_before, bench_ceiling(mode, logs))
        progress(f"ceiling again {report['ceiling']['after_streaming_gb_per_s']:.2f} GB/s")

        reset_peak_rss()
        report["pymia"] = bench_pymia_streaming(mode, data)
        client_peak["pymia_streaming"] = peak_rss_mb()

        report["durable_writes"] = bench_durable_writes(mode, work)
        progress(f"durable writes {report['durable_writes']['mb_per_s']:.0f} MB/s")
        reset_peak_rss()
        report["assembly"], assembly_rss = bench_assembly(mode, data, work, logs)
        client_peak["assembly"] = peak_rss_mb()
        report["seed_loop"] = bench_seed_loop(mode, data, work, logs)
        report["sampling"] = bench_sampling(mode, data, work, logs)

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
    report["scaling"] = bench_scaling(mode, data, logs)
    report["link"] = bench_link(mode, out, logs, link_rate)
    report["targets"] = targets(report) + link_targets(report["link"], mode)
    return report


def run_link(mode: Mode, out: Path, link_rate: str = LINK_RATE) -> dict[str, Any]:
    """Section i alone (``--only link``)."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "_mode": mode,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "link": bench_link(mode, out, out / "logs", link_rate),
    }
    report["targets"] = link_targets(report["link"], mode)
    return report


def link_table(report: dict[str, Any]) -> str:
    """The printed table of ``--only link``."""
    m, mode = report["machine"], report["_mode"]
    lines = [
        f"patchwire benchmark ({mode.name}, link only), {report['date']}",
        f"machine: {m['cpu']}, {m['cores_usable']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"grpcio {m['grpcio']}",
        "",
        *link_lines(report["link"], mode),
    ]
    passed = sum(t["passed"] for t in report["targets"])
    lines += ["", f"{passed}/{len(report['targets'])} targets met"]
    return "\n".join(lines)


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
    parser.add_argument(
        "--only", choices=("link",), default=None, help="run one section alone (link: the 10 Gbit/s link section)"
    )
    parser.add_argument(
        "--link-rate", default=LINK_RATE, help=f"the link section's rate, as tc spells it (default {LINK_RATE})"
    )
    args = parser.parse_args(None if argv is None else list(argv))
    mode = SMOKE if args.smoke else FULL
    if args.budget is not None:
        mode = dataclasses.replace(mode, budget_s=args.budget)
    start = time.perf_counter()
    if args.only == "link":
        report = run_link(mode, args.out, args.link_rate)
    else:
        report = run(mode, args.out, args.cache_mb, args.link_rate)
    report["wall_s"] = time.perf_counter() - start
    table = link_table(report) if args.only == "link" else format_table(report)
    print(table, flush=True)
    (args.out / "bench.txt").write_text(table + "\n")
    (args.out / "bench.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    written = [args.out / "bench.json"]
    if args.only is None:
        plot(report, args.out / "bench.png")
        written.append(args.out / "bench.png")
    if not report["link"].get("skipped"):
        plot_link(report["link"], mode, args.out / "link.png")
        written.append(args.out / "link.png")
    print(f"wrote {', '.join(map(str, written))} ({report['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
