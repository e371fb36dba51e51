"""Section j, every core of one server: aggregate streaming throughput of ``patchwire serve --workers N`` for N = 1, 2,
4, ... up to the machine's usable cores, with N clients, each a process of its own with its own channel.

For every N one server is started (``--workers N``, the benchmark's file, default block cache per worker); for each
pattern (axial slices and cubic patches) N client processes (``python benchmarks/_scaling.py client ...``) each
connect until their connection lands on worker ``i`` (the kernel spreads connections over the workers by a hash of
their addresses, unevenly for a handful of long streams: pinning measures what the workers can serve, one stream
each), stream shard ``i`` of ``N`` of shuffled epochs (``ds.batches(batch_size=16, shuffle=True)``, images and
labels, numpy arrays: no torch), warm up (their shard's first epoch, at most the warm-up), say so and wait; once all are
warm they start together, stream for the budget and report samples, tensor bytes and their CPU time. A row: the
sum of the clients' samples/s and GB/s, the speed-up over one worker, and the CPU cores the server's processes and
the clients kept busy over the window (``/proc``).

What it shows depends on the machine. The clients run on the same machine as the server, so N workers and N clients
need about 2N cores before the clients are the limit: on a 2-core machine one worker and one client already use both
cores and more workers cannot add throughput (the rows show the processes sharing those cores); on 16 cores the rows
up to 8 show how streaming scales with processes.

Which N: ``PATCHWIRE_BENCH_WORKERS`` (e.g. ``1,2,4,8,16``) or, standalone, ``python benchmarks/_scaling.py --workers
1,2,4,8 [--smoke] [--out DIR]``; by default the powers of two up to the usable cores, and the usable cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from _launch import child_env, patchwire_server
from _link import process_tree_cpu_s
from _plan import BATCH_SIZE, CATEGORIES, DATASET, FULL, HERE, SMOKE, Mode, patterns, progress

#: Seconds each row is measured (the mode's budget, at most this), and at most this long a client warms up: a row
#: then takes about 10 s, so the section stays under a minute on 2 cores.
SCALING_BUDGET_S = 4.0
SCALING_WARMUP_S = 3.0
#: The patterns measured (keys of ``_plan.patterns``): the slices whose samples are cheapest to make and the patches
#: whose samples cost the server most.
PATTERNS = ("axial", "patches")
ENV = "PATCHWIRE_BENCH_WORKERS"
PIN_TRIES = 256
READY = "ready"


def worker_counts(environ: dict[str, str] | None = None, cpus: int | None = None) -> list[int]:
    """The numbers of workers to measure: ``PATCHWIRE_BENCH_WORKERS`` (comma-separated), else 1, 2, 4, ... up to the
    usable cores, and the usable cores."""
    given = (os.environ if environ is None else environ).get(ENV, "").strip()
    if given:
        return parse_counts(given)
    usable = cpus if cpus is not None else len(os.sched_getaffinity(0))
    counts = [1]
    while counts[-1] * 2 <= usable:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == usable else [*counts, usable]


def parse_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if not counts or counts[0] < 1:
        raise ValueError(f"worker counts: positive integers separated by commas, got {text!r}")
    return counts


# -- the client processes -----------------------------------------------------------------------------------------


def _pinned_client(address: str, worker: int) -> Any:
    """A client whose connection is held by ``worker``: connects again until it is (each client channel gets its own
    connection)."""
    import patchwire.client as pw
    from patchwire.client import _connection
    from patchwire.v1 import server_service_pb2, server_service_pb2_grpc

    _connection.RECONNECT_OPTIONS = [*_connection.RECONNECT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    for _ in range(PIN_TRIES):
        client = pw.connect(address)
        stub = server_service_pb2_grpc.ServerServiceStub(client._connection.channel)
        info = stub.GetServerInfo(server_service_pb2.GetServerInfoRequest(), timeout=30)
        if info.worker_index == worker:
            return client
        client.close()
    raise RuntimeError(f"no connection reached worker {worker} in {PIN_TRIES} tries")


def _payload(batch: dict[str, Any]) -> tuple[int, int]:
    """(samples, tensor bytes) of one batch of numpy arrays."""
    nbytes = sum(v.nbytes for v in batch.values() if hasattr(v, "nbytes"))
    return len(batch["sample_index"]), nbytes


def client_main(args: argparse.Namespace) -> int:
    """One client: pinned to worker ``shard % workers``, warms up, waits for ``go`` on stdin, streams for the
    budget, prints its result as JSON."""
    from patchwire.client import extraction as pw_extr

    pattern = {p.key: p for p in patterns(SMOKE if args.smoke else FULL)}[args.pattern]
    client = _pinned_client(args.address, args.shard % args.workers)
    ds = client.datasource(DATASET, pattern.patchwire_indexing(), pw_extr.DataExtractor(CATEGORIES))
    options = {"batch_size": BATCH_SIZE, "shuffle": True, "seed": 0, "shard_index": args.shard, "shard_count": args.of}

    def epochs(first: int) -> Iterator[dict[str, Any]]:
        epoch = first
        while True:
            yield from ds.batches(epoch=epoch, **options)
            epoch += 1

    begin = time.perf_counter()
    warm = epochs(0)
    for _ in warm:  # the shard's first epoch, at most the warm-up
        if time.perf_counter() - begin >= args.warmup:
            break
    warm.close()
    print(READY, flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    samples = nbytes = 0
    start, cpu = time.perf_counter(), time.process_time()
    stream = epochs(1)
    for batch in stream:
        n, b = _payload(batch)
        samples, nbytes = samples + n, nbytes + b
        if time.perf_counter() - start >= args.budget:
            break
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    stream.close()
    ds.close()
    client.close()
    print(json.dumps({"samples": samples, "bytes": nbytes, "seconds": seconds, "cpu_s": cpu_s}), flush=True)
    return 0


# -- the section --------------------------------------------------------------------------------------------------


def _start_clients(address: str, pattern: str, workers: int, mode: Mode, budget: float) -> list[subprocess.Popen[str]]:
    command = [sys.executable, str(Path(__file__).resolve()), "client", "--address", address]
    command += ["--pattern", pattern, "--workers", str(workers), "--of", str(workers)]
    command += ["--budget", f"{budget:g}", "--warmup", f"{min(SCALING_WARMUP_S, max(mode.warmup_s, mode.budget_s)):g}"]
    command += ["--smoke"] if mode.name == "smoke" else []
    return [
        subprocess.Popen(
            [*command, "--shard", str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=HERE,
        )
        for i in range(workers)
    ]


def _line(stream: IO[str] | None, what: str) -> str:
    assert stream is not None
    line = stream.readline()
    if not line:
        raise RuntimeError(f"a scaling client ended before {what}")
    return line.strip()


def measure_row(address: str, server_pid: int, pattern: str, workers: int, mode: Mode) -> dict[str, Any]:
    """``workers`` clients, one pinned to each worker, streaming together for the budget."""
    budget = min(mode.budget_s, SCALING_BUDGET_S)
    clients = _start_clients(address, pattern, workers, mode, budget)
    try:
        for c in clients:
            if _line(c.stdout, "it was warm") != READY:
                raise RuntimeError("a scaling client did not say it was ready")
        server_cpu, start = process_tree_cpu_s(server_pid)[0], time.perf_counter()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        results = [json.loads(_line(c.stdout, "its result")) for c in clients]
        wall, server_cpu = time.perf_counter() - start, process_tree_cpu_s(server_pid)[0] - server_cpu
    finally:
        for c in clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.wait(timeout=30)
            if c.poll() is None:
                c.kill()
                c.wait()
            for stream in (c.stdin, c.stdout):
                if stream is not None:
                    stream.close()
    samples_per_s = sum(r["samples"] / r["seconds"] for r in results)
    bytes_per_s = sum(r["bytes"] / r["seconds"] for r in results)
    return {
        "workers": workers,
        "clients": workers,
        "samples_per_s": samples_per_s,
        "gb_per_s": bytes_per_s / 1e9,
        "server_cores_busy": server_cpu / wall,
        "client_cores_busy": sum(r["cpu_s"] for r in results) / wall,
        "per_client_samples_per_s": [r["samples"] / r["seconds"] for r in results],
    }


def bench_scaling(mode: Mode, data: Path, logs: Path, counts: Sequence[int] | None = None) -> dict[str, Any]:
    """Every pattern of :data:`PATTERNS` with 1..N workers and as many clients (``counts``: default
    :func:`worker_counts`, in smoke mode 1 and 2)."""
    counts = list(counts or (worker_counts() if mode.name != SMOKE.name or os.environ.get(ENV) else [1, 2]))
    chosen = [p for p in patterns(mode) if p.key in PATTERNS]
    rows: dict[str, list[dict[str, Any]]] = {p.key: [] for p in chosen}
    for n in counts:
        with patchwire_server(data, None, logs / f"scaling-{n}.log", extra=("--workers", str(n))) as server:
            for pattern in chosen:
                row = measure_row(server.address, server.process.pid, pattern.key, n, mode)
                first = rows[pattern.key][0] if rows[pattern.key] else row
                row["speedup"] = row["samples_per_s"] / first["samples_per_s"]
                rows[pattern.key].append(row)
                progress(
                    f"scaling {pattern.label}, {n} worker(s): {row['samples_per_s']:.0f} samples/s, "
                    f"{row['gb_per_s']:.2f} GB/s ({row['speedup']:.2f}x)"
                )
    return {
        "counts": counts,
        "cores_usable": len(os.sched_getaffinity(0)),
        "labels": {p.key: p.label for p in chosen},
        "rows": rows,
        "budget_s": min(mode.budget_s, SCALING_BUDGET_S),
    }


def scaling_lines(scaling: dict[str, Any]) -> list[str]:
    """The section's part of the printed table."""
    header = (
        f"{'every core (--workers N, N clients)':<36} {'N':>3} {'samples/s':>10} {'GB/s':>7} {'x N=1':>6} "
        f"{'server cores':>12} {'client cores':>12}"
    )
    lines = [header, "-" * len(header)]
    for key, rows in scaling["rows"].items():
        for row in rows:
            lines.append(
                f"{scaling['labels'][key]:<36} {row['workers']:>3} {row['samples_per_s']:>10.0f} "
                f"{row['gb_per_s']:>7.2f} {row['speedup']:>5.2f}x {row['server_cores_busy']:>12.2f} "
                f"{row['client_cores_busy']:>12.2f}"
            )
    lines += [
        f"every core context: {scaling['cores_usable']} usable cores; clients run on this machine too, one process "
        "and channel each,",
        f"  pinned to one worker each; {scaling['budget_s']:g} s per row. Cores busy: CPU seconds per second of the "
        "server's processes",
        "  and of the clients; where both add up to the machine's cores, more workers cannot add throughput.",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="patchwire serve --workers N: aggregate streaming throughput")
    sub = parser.add_subparsers(dest="command")
    client = sub.add_parser("client", help="(internal) one streaming client")
    client.add_argument("--address", required=True)
    client.add_argument("--pattern", required=True)
    client.add_argument("--shard", type=int, required=True)
    client.add_argument("--of", type=int, required=True)
    client.add_argument("--workers", type=int, required=True)
    client.add_argument("--budget", type=float, required=True)
    client.add_argument("--warmup", type=float, required=True)
    client.add_argument("--smoke", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny data and budgets")
    parser.add_argument("--workers", type=parse_counts, default=None, help="e.g. 1,2,4,8 (default: see the module)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.command == "client":
        return client_main(args)
    from _data import ensure_dataset, warm_page_cache

    mode = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    data, _ = ensure_dataset(mode, args.out)
    warm_page_cache(data)
    scaling = bench_scaling(mode, data, args.out / "logs", args.workers)
    print("\n".join(scaling_lines(scaling)), flush=True)
    (args.out / "scaling.json").write_text(json.dumps(scaling, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
