"""Section i, a real link: the ceiling, streaming and assembly over a loopback rate-limited to 10 Gbit/s, each
uncompressed and compressed, in the same run on the same link; and streaming over plain loopback with compression
off and on. Compressed streaming is measured twice: from the server as it runs by default, which keeps the samples
of these deterministic datasources compressed after the warm-up epoch, and from one that keeps none
(``--packed-cache-mb 0``: every sample read and compressed for every request, as for random datasources and in a
first epoch).

The link is the loopback of a network namespace of its own with a token-bucket filter on it (``ip netns add NAME``,
``tc qdisc add dev lo root tbf rate 10gbit burst 4mb latency 50ms``): every byte between server and client crosses
it, both directions sharing the rate, as on one 10 Gbit/s network link. The servers and the client run in that
namespace (a child process, ``ip netns exec NAME python benchmarks/_link.py PLAN RESULT``, starts them and measures
there); the servers run with ``--no-shared-memory``, so nothing takes the same-host shortcut. A second namespace
without a filter gives the plain-loopback rows. Both namespaces are removed at the end, also on an error, Ctrl-C or
SIGTERM, with any process still in them. Needs root and iproute2 (``ip``, ``tc``); otherwise the section is skipped
and the table says why.

The data is the skull-stripped phantom (``benchmarks/_data.py``: zero outside a brain mask, about 80% of the image
values), since compression of images gains from that background and skull-stripped scans have it. For every row:
samples/s and GB/s of tensors delivered to torch (decompressed), the fraction of raw gRPC on the same link (1 MiB
``bytes`` messages, ``ceiling_server.py``), the ratio to the uncompressed row, the compression ratio as measured on
the link (tensor bytes delivered / bytes that crossed the link, packet headers and both directions included: about
0.97 uncompressed), and the CPU each end spent per GB delivered (server: ``utime + stime`` of its process and any
children over the measured window, ``/proc/PID/stat``; client: this process's ``time.process_time()``, every thread
of it). The goal: compression gives at least :data:`TARGET_VS_UNCOMPRESSED` times the uncompressed samples/s.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _plan import HERE, MB, Mode, patterns, progress

#: The link's rate, as ``tc`` spells it (``bench.py --link-rate`` sets another: ``1gbit``, ``25gbit``).
LINK_RATE = "10gbit"
#: The token-bucket filter on the namespace's loopback: a burst of 4 MB, packets wait at most 50 ms for tokens.
TBF = ("tbf", "rate", LINK_RATE, "burst", "4mb", "latency", "50ms")
#: Seconds each streaming loader is measured after its warm-up: the mode's budget, at most this, so that the section
#: stays near two minutes on a 2-core machine.
LINK_BUDGET_S = 4.0
#: A loader's warm-up is its first epoch (after it the server's block cache holds what the pattern reads and its
#: axis-2 and patch copies are built, so the codec measured first pays for none of that), at most this long.
LINK_WARMUP_S = 20.0
#: The goal on the limited link: compressed samples/s at least this many times the uncompressed samples/s.
TARGET_VS_UNCOMPRESSED = 1.5
NAMESPACE_PREFIX = "patchwire-bench"
#: How long processes left in a namespace get after SIGTERM before they are killed, when it is removed.
STOP_TIMEOUT_S = 5.0


class NamespaceError(RuntimeError):
    """A network namespace or its filter could not be set up (the section is then skipped, with this message)."""


@dataclass(frozen=True)
class Codec:
    """One way of sending the data: ``connect`` and ``datasource`` are the keyword arguments it gives
    ``pw.connect`` and ``client.datasource``."""

    key: str
    label: str
    connect: tuple[tuple[str, Any], ...] = ()
    datasource: tuple[tuple[str, Any], ...] = ()
    uncached: bool = False
    """Measured against a server that keeps no sample compressed (``--packed-cache-mb 0``): every sample read and
    compressed for every request, as for random datasources and in a first epoch."""

    @property
    def compressed(self) -> bool:
        return self.key != "none"

    @property
    def whole_client(self) -> bool:
        """Whether it applies to everything the client sends and receives (assembly too), not to one datasource."""
        return bool(self.connect)


UNCOMPRESSED = Codec("none", "uncompressed")
#: The codecs measured, where the client has them (its ``compression=`` option), the one ``"auto"`` picks first:
#: byte shuffle with LZ4 (fast) and with Zstandard (smaller); plain LZ4 of whole payloads is left out (it is for
#: label maps, and what ``label_compression`` measured on them already).
LINK_CODECS = ("shuffle-lz4", "shuffle-zstd")


def codecs() -> list[Codec]:
    """What the section measures: uncompressed first (asked for explicitly: ``compression="auto"`` would decide by
    the address, and every address in a namespace is loopback), then each of :data:`LINK_CODECS` for the whole
    client, then the first of them from a server that keeps no sample compressed (where the server has that cache);
    with a client that has no ``compression=`` option, LZ4 label maps (``label_compression``)."""
    import patchwire.client as pw

    if "compression" not in inspect.signature(pw.connect).parameters:
        return [UNCOMPRESSED, Codec("lz4_labels", "lz4 labels", datasource=(("label_compression", "lz4"),))]
    from patchwire.wire import compression

    chosen = [c for c in LINK_CODECS if c in compression.SUPPORTED]
    none = Codec(UNCOMPRESSED.key, UNCOMPRESSED.label, connect=(("compression", "none"),))
    out = [none, *(Codec(c, c, connect=(("compression", c),)) for c in chosen)]
    if _server_keeps_samples():
        first = chosen[0]
        out.append(Codec(f"{first}-uncached", f"{first.removeprefix('shuffle-')}, no cache", out[1].connect, (), True))
    return out


def _server_keeps_samples() -> bool:
    """Whether this build's server keeps samples compressed (``patchwire serve --packed-cache-mb``)."""
    from patchwire.service._server import ServerConfig

    return "packed_cache_bytes" in ServerConfig.__dataclass_fields__


def loopback_codecs() -> list[Codec]:
    """What plain loopback compares against none: the first compression :func:`codecs` lists, and its uncached
    row."""
    chosen = codecs()
    return [chosen[1], *(c for c in chosen if c.uncached)]


# ---------------------------------------------------------------------------------------------- the namespaces


def unavailable() -> str | None:
    """Why this machine cannot run the section (None when it can try): it needs Linux, root and iproute2."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root for ip netns and tc (run the benchmark as root to measure the 10 Gbit/s link)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


def _command(*args: str) -> str:
    """Runs an ``ip`` / ``tc`` command; NamespaceError with its stderr when it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceError(f"{' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise NamespaceError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def network_namespace(rate: str | None) -> Iterator[str]:
    """A new network namespace with a unique name and its loopback up, rate-limited by :data:`TBF` (at ``rate``)
    unless ``rate`` is None; yields its name. On exit every process still in it is stopped (SIGTERM, then SIGKILL
    after :data:`STOP_TIMEOUT_S`) and the namespace is removed, whatever ended the block. NamespaceError when it
    cannot be made."""
    name = f"{NAMESPACE_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    _command("ip", "netns", "add", name)
    try:
        _command("ip", "-n", name, "link", "set", "lo", "up")
        if rate is not None:
            _command("tc", "-n", name, "qdisc", "add", "dev", "lo", "root", *TBF[:2], rate, *TBF[3:])
        yield name
    finally:
        _stop_processes(name)
        _command("ip", "netns", "delete", name)


def qdisc(namespace: str) -> str:
    """The queueing discipline on the namespace's loopback, as ``tc qdisc show`` prints it."""
    return _command("tc", "-n", namespace, "qdisc", "show", "dev", "lo").strip()


def namespaces() -> list[str]:
    """The names of the network namespaces that exist (``ip netns list``)."""
    return [line.split()[0] for line in _command("ip", "netns", "list").splitlines() if line.strip()]


def _stop_processes(namespace: str) -> None:
    """Stops what is left in the namespace (only this section starts processes there)."""
    try:
        pids = [int(pid) for pid in _command("ip", "netns", "pids", namespace).split()]
    except NamespaceError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit while the block runs, so that the namespaces are removed as on Ctrl-C."""
    if not hasattr(signal, "SIGTERM") or signal.getsignal(signal.SIGTERM) is None:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------- the measurements


@dataclass(frozen=True)
class Snapshot:
    """The clocks and counters a measured window is the difference of."""

    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    link_bytes: int


def process_tree_cpu_s(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) that process ``pid`` and its descendants have used, and how many processes
    that is (``/proc/PID/stat``, children from ``/proc/PID/task/*/children``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending, seen = [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:  # it ended
            continue
        seen.add(current)
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces: state is first
        total += (int(fields[11]) + int(fields[12])) / ticks
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pending += [int(child) for child in children.read_text().split()]
    return total, len(seen)


def link_bytes(interface: str = "lo") -> int:
    """Bytes the interface of this process's network namespace has sent (``/proc/net/dev``; on loopback every
    packet, either direction, is sent once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == interface:
            return int(counters.split()[8])
    raise RuntimeError(f"no interface {interface} in /proc/net/dev")


def snapshot(server_pid: int) -> Snapshot:
    return Snapshot(time.perf_counter(), time.process_time(), process_tree_cpu_s(server_pid)[0], link_bytes())


def window(start: Snapshot, end: Snapshot, delivered: int, samples: int | None = None) -> dict[str, Any]:
    """A measured window: ``delivered`` tensor bytes (decompressed) and ``samples`` between two snapshots."""
    seconds = end.wall_s - start.wall_s
    crossed = end.link_bytes - start.link_bytes
    gb = delivered / 1e9
    out = {
        "seconds": seconds,
        "bytes": delivered,
        "bytes_per_s": delivered / seconds,
        "gb_per_s": delivered / seconds / 1e9,
        "mb_per_s": delivered / seconds / MB,
        "link_bytes": crossed,
        "link_gbit_per_s": crossed * 8 / seconds / 1e9,
        "compression_ratio": delivered / crossed if crossed else None,
        "server_cpu_s": end.server_cpu_s - start.server_cpu_s,
        "client_cpu_s": end.client_cpu_s - start.client_cpu_s,
        "server_cpu_s_per_gb": (end.server_cpu_s - start.server_cpu_s) / gb if gb else None,
        "client_cpu_s_per_gb": (end.client_cpu_s - start.client_cpu_s) / gb if gb else None,
    }
    if samples is not None:
        out["samples"] = samples
        out["samples_per_s"] = samples / seconds
    return out


def measure_ceiling(mode: Mode, log: Path) -> dict[str, Any]:
    """Raw gRPC server streaming of 1 MiB ``bytes`` messages (``ceiling_server.py``), ``mode.ceiling_runs`` runs of
    ``mode.ceiling_messages`` after a warm-up; the totals of all runs count."""
    import grpc
    from _ceiling import CEILING_BANNER
    from _launch import logged_server
    from _plan import CEILING_MESSAGE_BYTES, CEILING_METHOD

    from patchwire.wire import framing

    args = [sys.executable, str(HERE / "ceiling_server.py")]
    with logged_server(args, log, CEILING_BANNER) as server:
        pid = server.process.pid
        channel = grpc.insecure_channel(server.address, options=framing.channel_options())
        try:
            stream = channel.unary_stream(CEILING_METHOD, _registered_method=False)
            for _ in stream(b"16,1048576", wait_for_ready=True, timeout=30):
                pass
            request = f"{mode.ceiling_messages},{CEILING_MESSAGE_BYTES}".encode()
            runs = []
            start = snapshot(pid)
            for _ in range(mode.ceiling_runs):
                began = time.perf_counter()
                received = sum(len(message) for message in stream(request, timeout=300))
                runs.append(received / (time.perf_counter() - began))
            result = window(start, snapshot(pid), mode.ceiling_runs * mode.ceiling_messages * CEILING_MESSAGE_BYTES)
        finally:
            channel.close()
    return result | {"runs_gb_per_s": [r / 1e9 for r in runs], "message_bytes": CEILING_MESSAGE_BYTES}


def measure_stream(
    make_iterator: Callable[[int], Iterator[dict[str, Any]]], server_pid: int, budget_s: float, warmup_s: float
) -> dict[str, Any]:
    """Consumes epochs (``make_iterator(epoch)``): a warm-up (the first epoch, at most ``warmup_s``: see
    :data:`LINK_WARMUP_S`), then a window of ``budget_s`` between two snapshots."""
    from _streaming import batch_payload

    begin = time.perf_counter()
    start: Snapshot | None = None
    end: Snapshot | None = None
    samples = delivered = 0
    epoch = 0
    while end is None:
        iterator = make_iterator(epoch)
        empty = True
        for batch in iterator:
            empty = False
            if start is None:
                if time.perf_counter() - begin >= warmup_s:  # a long first epoch: measure the rest of it
                    start = snapshot(server_pid)
                continue
            n, nbytes = batch_payload(batch)
            samples += n
            delivered += nbytes
            if time.perf_counter() - start.wall_s >= budget_s:
                end = snapshot(server_pid)
                break
        del iterator  # ends the stream when left mid-epoch
        if empty:
            raise RuntimeError("a loader yielded no batch")
        epoch += 1
        if start is None:  # the first epoch ended within the warm-up
            start = snapshot(server_pid)
    assert start is not None
    return window(start, end, delivered, samples) | {"epochs_started": epoch}


def measure_streaming(mode: Mode, plan: dict[str, Any], servers: dict[bool, tuple[int, str]]) -> dict[str, Any]:
    """Every pattern with every codec of the plan, one client per codec; for each pattern its codecs one right
    after the other, so the rows compared meet the machine in the same state. ``servers``: (pid, address) of the
    server that keeps samples compressed (False) and, for uncached codecs, of one that keeps none (True)."""
    from _plan import CATEGORIES, DATASET
    from _streaming import epochs

    import patchwire.client as pw
    from patchwire.client import extraction as pw_extr

    chosen = [c for c in codecs() if c.key in plan["codecs"]]
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        clients = {c.key: stack.enter_context(pw.connect(servers[c.uncached][1], **dict(c.connect))) for c in chosen}
        for pattern in patterns(mode):
            results[pattern.key] = {}
            for codec in chosen:
                ds = clients[codec.key].datasource(
                    DATASET, pattern.patchwire_indexing(), pw_extr.DataExtractor(CATEGORIES), **dict(codec.datasource)
                )
                try:
                    pid = servers[codec.uncached][0]
                    result = measure_stream(epochs(ds), pid, plan["budget_s"], plan["warmup_s"])
                finally:
                    ds.close()
                results[pattern.key][codec.key] = result
                progress(
                    f"{plan['name']} {pattern.label}, {codec.label}: {result['samples_per_s']:.0f} samples/s, "
                    f"{result['gb_per_s']:.2f} GB/s, ratio {result['compression_ratio']:.2f}"
                )
    return results


def measure_assembly(mode: Mode, plan: dict[str, Any], data: Path, server_pid: int, address: str) -> dict[str, Any]:
    """Every prediction of every subject (its images), slice-wise and patch-wise, posted over the wire through
    ``client.assembler(shared_memory=False)`` and each finished subject fetched back, once per codec of the plan
    that applies to a whole client (uncompressed included), after one run that is not counted: the first run on a
    fresh server pays for its memory (a first uncompressed run took twice as long as the compressed ones after it,
    which compressed nothing), the first compressed one for loading blosc2."""
    from _assembly import _assemble_patchwire, assembly_cases, prediction_batches, subject_images
    from _plan import DATASET
    from _pymia import load_pymia

    import patchwire.client as pw
    from patchwire.client import extraction as pw_extr

    pm = load_pymia()
    # (the labels without their notes: the link table's pattern column is narrow)
    cases = [(key, label.split(" (")[0], *indexings) for key, label, *indexings in assembly_cases(pm, mode)]
    chosen = [c for c in codecs() if c.key in plan["codecs"] and (c.whole_client or not c.compressed)]
    chosen = [c for c in chosen if not c.uncached]  # (posted predictions are compressed by the client)
    extractor = pm.extraction.DataExtractor(categories=("images",))
    images = subject_images(pm, data)
    results: dict[str, Any] = {}
    for key, label, pymia_indexing, pw_indexing in cases:
        pymia_ds = pm.extraction.PymiaDatasource(str(data), pymia_indexing, extractor)
        batches = prediction_batches(pymia_ds, images)
        samples = len(pymia_ds)
        pymia_ds.close_reader()
        predicted = sum(pred.nbytes for b in batches for pred in b.predictions)
        results[key] = {"label": label}
        warmup = chosen[-1]  # a compressed run where there is one: it also loads the codecs on both ends
        for codec in [warmup, *chosen]:
            with pw.connect(address, **dict(codec.connect)) as client:
                ds = client.datasource(DATASET, pw_indexing, pw_extr.DataExtractor(("images",)))
                start = snapshot(server_pid)
                run = _assemble_patchwire(client, ds, batches, images, False)
                end = snapshot(server_pid)
                ds.close()
            if "warmup_seconds" not in results[key]:
                results[key]["warmup_seconds"] = end.wall_s - start.wall_s
                continue
            # posted and fetched back: every prediction byte crosses the link twice
            result = {**run, **window(start, end, 2 * predicted, samples)}
            result["prediction_bytes"] = predicted
            result["subjects_per_s"] = run["subjects"] / result["seconds"]
            results[key][codec.key] = result
            progress(
                f"{plan['name']} assembly {label}, {codec.label}: {result['samples_per_s']:.0f} samples/s, "
                f"ratio {result['compression_ratio']:.2f}, verified {run['verified']}"
            )
        del batches
    return results


def measure(plan: dict[str, Any]) -> dict[str, Any]:
    """What the child process measures in its namespace: the ceiling, streaming and, where the plan asks,
    assembly, each with its own ``patchwire serve --no-shared-memory``."""
    from _launch import patchwire_server

    from patchwire.wire.malloc import tune_client_process

    tune_client_process()
    mode = Mode(**{**plan["mode"], "shape": tuple(plan["mode"]["shape"])})
    data, logs, name = Path(plan["data"]), Path(plan["logs"]), plan["name"]
    result: dict[str, Any] = {"ceiling_before": measure_ceiling(mode, logs / f"ceiling-{name}-before.log")}
    progress(f"{name} raw gRPC {result['ceiling_before']['gb_per_s']:.2f} GB/s")
    server = patchwire_server(data, None, logs / f"server-{name}-streaming.log", extra=("--no-shared-memory",))
    with contextlib.ExitStack() as stack:
        launched = stack.enter_context(server)
        servers = {False: (launched.process.pid, launched.address)}
        if any(c.uncached for c in codecs() if c.key in plan["codecs"]):
            extra = ("--no-shared-memory", "--packed-cache-mb", "0")
            uncached = stack.enter_context(
                patchwire_server(data, None, logs / f"server-{name}-uncached.log", extra=extra)
            )
            servers[True] = (uncached.process.pid, uncached.address)
        result["streaming"] = measure_streaming(mode, plan, servers)
        result["server_processes"] = process_tree_cpu_s(launched.process.pid)[1]
    if plan["assembly"]:
        server = patchwire_server(data, None, logs / f"server-{name}-assembly.log", extra=("--no-shared-memory",))
        with server as launched:
            result["assembly"] = measure_assembly(mode, plan, data, launched.process.pid, launched.address)
    result["ceiling_after"] = measure_ceiling(mode, logs / f"ceiling-{name}-after.log")
    progress(f"{name} raw gRPC again {result['ceiling_after']['gb_per_s']:.2f} GB/s")
    return result


def _run_child(namespace: str, plan: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Runs :func:`measure` in a child process inside ``namespace`` and returns what it wrote."""
    from _launch import child_env

    plan_path = folder / f"{plan['name']}-plan.json"
    result_path = folder / f"{plan['name']}-result.json"
    plan_path.write_text(json.dumps(plan))
    command = ["ip", "netns", "exec", namespace, sys.executable, str(Path(__file__).resolve()), str(plan_path)]
    done = subprocess.run([*command, str(result_path)], env=child_env(), timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {plan['name']} measurement failed (exit code {done.returncode}); see {plan['logs']}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


# ------------------------------------------------------------------------------------------------ the section


def bench_link(mode: Mode, out: Path, logs: Path, rate: str = LINK_RATE) -> dict[str, Any]:
    """The section: the skull-stripped data, then the link limited to ``rate`` and plain loopback, each in its own
    namespace; ``{"skipped": reason}`` where namespaces cannot be made here."""
    from _data import ensure_dataset, warm_page_cache, zero_fractions

    reason = unavailable()
    if reason is not None:
        progress(f"link: skipped, {reason}")
        return {"skipped": reason}
    data, generated_s = ensure_dataset(mode, out, skull_stripped=True)
    warm_page_cache(data)
    budget_s = min(mode.budget_s, LINK_BUDGET_S)
    warmup_s = LINK_WARMUP_S
    report: dict[str, Any] = {
        "skipped": None,
        "rate": rate,
        "tbf": " ".join((*TBF[:2], rate, *TBF[3:])),
        "budget_s": budget_s,
        "warmup_s": warmup_s,
        "data": {
            "path": str(data),
            "subjects": mode.subjects,
            "shape": list(mode.shape),
            "file_mb": data.stat().st_size / MB,
            "generated_s": generated_s,
            **zero_fractions(data),
        },
        "codecs": [
            {"key": c.key, "label": c.label, "whole_client": c.whole_client, "uncached": c.uncached} for c in codecs()
        ],
        "loopback_codecs": [c.key for c in loopback_codecs()],
    }
    progress(f"link: data {data} ({report['data']['image_zero_fraction']:.0%} of image values zero)")
    base = {"mode": asdict(mode), "data": str(data), "logs": str(logs), "budget_s": budget_s, "warmup_s": warmup_s}
    plans = {
        "link": base | {"name": "link", "codecs": [c.key for c in codecs()], "assembly": True},
        "loopback": base
        | {"name": "loopback", "codecs": [UNCOMPRESSED.key, *report["loopback_codecs"]], "assembly": False},
    }
    logs.mkdir(parents=True, exist_ok=True)
    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="patchwire-link-") as tmp:
        try:
            for name, limit in (("link", rate), ("loopback", None)):
                with network_namespace(limit) as namespace:
                    if limit is not None:
                        report["qdisc"] = qdisc(namespace)
                    report[name] = _run_child(namespace, plans[name], Path(tmp))
        except NamespaceError as exc:
            progress(f"link: skipped, {exc}")
            return {"skipped": str(exc)}
    _derive(report)
    return report


def _derive(report: dict[str, Any]) -> None:
    """Adds to every row its fraction of raw gRPC on the same link (the median of the ceiling's runs before and
    after), its ratio to the uncompressed row and whether it meets the goal."""
    for name in ("link", "loopback"):
        part = report[name]
        runs = sorted(part["ceiling_before"]["runs_gb_per_s"] + part["ceiling_after"]["runs_gb_per_s"])
        ceiling_gb = (runs[(len(runs) - 1) // 2] + runs[len(runs) // 2]) / 2
        part["ceiling_gb_per_s"] = ceiling_gb
        for group in ("streaming", "assembly"):
            for rows in part.get(group, {}).values():
                plain = rows[UNCOMPRESSED.key]
                for key, row in rows.items():
                    if not isinstance(row, dict):  # the case's label and warm-up
                        continue
                    row["vs_raw_grpc"] = row["gb_per_s"] / ceiling_gb
                    row["vs_uncompressed"] = row["samples_per_s"] / plain["samples_per_s"]
                    row["goal_met"] = (
                        None if key == UNCOMPRESSED.key else row["vs_uncompressed"] >= TARGET_VS_UNCOMPRESSED
                    )


# --------------------------------------------------------------------------------------------------- reporting


def link_targets(link: dict[str, Any], mode: Mode) -> list[dict[str, Any]]:
    """The goal as targets of the run, one per streaming pattern: its best compression against uncompressed on the
    limited link (none when the section was skipped: the table says why)."""
    if link.get("skipped"):
        return []
    labels = {p.key: p.label for p in patterns(mode)}
    uncached = {c["key"] for c in link["codecs"] if c.get("uncached")}  # (the goal is the default server's)
    out = []
    for key, rows in link["link"]["streaming"].items():
        cached = [k for k in rows if k != UNCOMPRESSED.key and k not in uncached]
        best_key = max(cached, key=lambda k: rows[k]["vs_uncompressed"])
        value = rows[best_key]["vs_uncompressed"]
        name = f"{link['rate']} link, {labels[key]}: {_codec_label(link, best_key)} / uncompressed (samples/s)"
        out.append(
            {
                "name": name,
                "value": value,
                "op": ">=",
                "threshold": TARGET_VS_UNCOMPRESSED,
                "unit": "x",
                "passed": value >= TARGET_VS_UNCOMPRESSED,
            }
        )
    return out


def _codec_label(link: dict[str, Any], key: str) -> str:
    return next(c["label"] for c in link["codecs"] if c["key"] == key)


def _cpu(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def link_lines(link: dict[str, Any], mode: Mode) -> list[str]:
    """The section's part of the printed table."""
    if link.get("skipped"):
        return [f"link (rate-limited network namespace): SKIPPED, {link['skipped']}"]
    d = link["data"]
    labels = {p.key: p.label for p in patterns(mode)}
    lines = [
        f"link: the loopback of a network namespace limited to {link['rate']} ({link['qdisc']}); server and client in "
        "the namespace, --no-shared-memory, every byte over the link",
        f"  data: {d['subjects']} skull-stripped subjects of {'x'.join(map(str, d['shape']))} (zero outside a brain "
        f"mask), {d['image_zero_fraction']:.1%} of image values zero, {d['labelled_fraction']:.1%} of voxels "
        f"labelled, {d['file_mb']:.0f} MB; {link['budget_s']:g} s per loader after its warm-up (its first epoch)",
        "  ratio: tensor bytes delivered / bytes that crossed the link (headers, both directions); CPU s/GB: "
        "per GB delivered; x raw: of raw gRPC on the same link; x none: samples/s against uncompressed",
    ]
    header = (
        f"  {'':<8} {'pattern':<26} {'compression':<13} {'samples/s':>10} {'GB/s':>6} {'x raw':>6} {'ratio':>6} "
        f"{'x none':>7} {'srv CPU':>8} {'cli CPU':>8} {'goal':>5}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for name in ("link", "loopback"):
        part = link[name]
        c = part["ceiling_before"]
        lines.append(
            f"  {name:<8} {'raw gRPC, 1 MiB messages':<26} {'':<13} {'':>10} {part['ceiling_gb_per_s']:>6.2f} "
            f"{1.0:>5.2f}x {_ratio(c['compression_ratio'])} {'':>7} {_cpu(c['server_cpu_s_per_gb']):>8} "
            f"{_cpu(c['client_cpu_s_per_gb']):>8}"
        )
        groups = [(labels[k], rows) for k, rows in part["streaming"].items()]
        groups += [(f"assembly, {rows['label']}", rows) for rows in part.get("assembly", {}).values()]
        for label, rows in groups:
            for key, row in rows.items():
                if not isinstance(row, dict):
                    continue
                goal = "" if row["goal_met"] is None else ("yes" if row["goal_met"] else "no")
                lines.append(
                    f"  {name:<8} {label:<26} {_codec_label(link, key):<13} {row['samples_per_s']:>10.0f} "
                    f"{row['gb_per_s']:>6.2f} {row['vs_raw_grpc']:>5.2f}x {_ratio(row['compression_ratio'])} "
                    f"{row['vs_uncompressed']:>6.2f}x {_cpu(row['server_cpu_s_per_gb']):>8} "
                    f"{_cpu(row['client_cpu_s_per_gb']):>8} {goal:>5}"
                )
    lines.append(
        f"  goal: compressed >= {TARGET_VS_UNCOMPRESSED:g}x the uncompressed samples/s on the {link['rate']} link; "
        f"assembly rows: every prediction posted and each finished subject fetched back (GB counts both); the "
        f"server ran {link['link']['server_processes']} process(es)"
    )
    return lines


def _ratio(value: float | None) -> str:
    return f"{'':>6}" if value is None else f"{value:>5.2f}x"


def plot_link(link: dict[str, Any], mode: Mode, path: Path) -> None:
    """``link.png``: samples/s against uncompressed, per pattern and compression, on the limited link and on plain
    loopback, with the goal."""
    if link.get("skipped"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {p.key: p.label for p in patterns(mode)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for ax, name in zip(axes, ("link", "loopback"), strict=True):
        part = link[name]
        groups = [(labels[k], rows) for k, rows in part["streaming"].items()]
        groups += [(f"assembly,\n{rows['label']}", rows) for rows in part.get("assembly", {}).values()]
        keys = [c["key"] for c in link["codecs"] if any(c["key"] in rows for _, rows in groups)]
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            xs = [i + (j - (len(keys) - 1) / 2) * width for i, (_, rows) in enumerate(groups) if key in rows]
            values = [rows[key]["vs_uncompressed"] for _, rows in groups if key in rows]
            ax.bar(xs, values, width, label=_codec_label(link, key))
        if name == "link":
            ax.axhline(TARGET_VS_UNCOMPRESSED, color="grey", linestyle=":", label=f"goal {TARGET_VS_UNCOMPRESSED:g}x")
            ax.set_ylim(0, max(ax.get_ylim()[1], TARGET_VS_UNCOMPRESSED * 1.25))
        ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=7)
        ax.set_ylabel("samples/s, x uncompressed")
        title = f"{link['rate']} link (tbf), raw gRPC {part['ceiling_gb_per_s']:.2f} GB/s"
        ax.set_title(title if name == "link" else f"plain loopback, raw gRPC {part['ceiling_gb_per_s']:.2f} GB/s")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"patchwire over a rate-limited link ({mode.name}): skull-stripped data, "
        f"{link['data']['image_zero_fraction']:.0%} of image values zero",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str]) -> int:
    """The child: ``_link.py PLAN.json RESULT.json`` measures the plan in this process's namespace."""
    plan = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(measure(plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
