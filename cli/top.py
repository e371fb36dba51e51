"""``patchwire top ADDRESS [--interval S] [--once]``: the calls a server serves now and their throughput, live.

Every ``--interval`` seconds (default 1) the server's ListStreams (admin role) gives every open call of every serving
process with what it has delivered so far; ``top`` shows per client (identity and peer host) and per stream the
samples/s and MB/s over the last interval, totals, age, and the share of time the server waited for the client
(gRPC flow control) rather than built messages: a stream that mostly waits is limited by its client or the network,
one that mostly works by the server. A stream that started within the interval is rated over its own age, so the
first view (and ``--once``, a single snapshot) shows each stream's average since it started.

In a terminal the view is redrawn in place (``rich``); when stdout is not a terminal, plain-text snapshots follow one
another (``--once``: one). Calls of ServerService itself (another ``top``) are left out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from patchwire.cli._flags import add_credential_flags
from patchwire.cli._interrupt import Interrupt

if TYPE_CHECKING:
    from patchwire.v1.server_service_pb2 import ListStreamsResponse

__all__ = ["ClientRow", "StreamRow", "View", "add_parser", "format_view", "host_of", "run", "run_top", "view_of"]

_MB = 1e6
_CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen
_SERVER_SERVICE = "/patchwire.v1.ServerService/"


@dataclass(frozen=True)
class StreamRow:
    """One open call and its rates over the last interval."""

    stream_id: str
    request_id: str
    identity: str
    peer: str
    method: str
    dataset: str
    pattern: str
    worker_index: int
    age_s: float
    samples: int
    bytes: int
    samples_per_s: float
    bytes_per_s: float
    wait_share: float
    """Share of the call's time spent waiting for the client (0 to 1)."""


@dataclass(frozen=True)
class ClientRow:
    """The streams of one client (identity and peer host) together."""

    identity: str
    host: str
    streams: int
    samples: int
    bytes: int
    samples_per_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class View:
    """What one refresh shows."""

    address: str
    replica_id: str
    time_unix: float
    streams: tuple[StreamRow, ...]
    clients: tuple[ClientRow, ...]

    @property
    def samples_per_s(self) -> float:
        return sum(s.samples_per_s for s in self.streams)

    @property
    def bytes_per_s(self) -> float:
        return sum(s.bytes_per_s for s in self.streams)


Previous = dict[tuple[str, float], tuple[float, int, int]]
"""(stream id, start) -> (server time, samples, bytes) at the previous refresh."""


def host_of(peer: str) -> str:
    """The host of a gRPC peer string: ``ipv4:10.0.0.5:41234`` -> ``10.0.0.5``, ``ipv6:[::1]:5`` -> ``::1``,
    ``unix:/path`` -> ``unix``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return kind or peer


def view_of(response: ListStreamsResponse, address: str, previous: Previous) -> tuple[View, Previous]:
    """The view of one ListStreams answer, rated against the ``previous`` refresh; and what the next one rates
    against."""
    now = response.time_unix
    rows: list[StreamRow] = []
    seen: Previous = {}
    for s in response.streams:
        if s.method.startswith(_SERVER_SERVICE):
            continue
        key = (s.stream_id, s.started_unix)
        since, samples0, bytes0 = previous.get(key, (s.started_unix, 0, 0))
        elapsed = max(now - since, 1e-6)
        busy = s.wait_seconds + s.work_seconds
        rows.append(
            StreamRow(
                stream_id=s.stream_id,
                request_id=s.request_id,
                identity=s.identity,
                peer=s.peer,
                method=s.method.rsplit("/", 1)[-1],
                dataset=s.dataset,
                pattern=s.pattern,
                worker_index=s.worker_index,
                age_s=max(now - s.started_unix, 0.0),
                samples=s.samples,
                bytes=s.bytes,
                samples_per_s=max(s.samples - samples0, 0) / elapsed,
                bytes_per_s=max(s.bytes - bytes0, 0) / elapsed,
                wait_share=s.wait_seconds / busy if busy > 0 else 0.0,
            )
        )
        seen[key] = (now, s.samples, s.bytes)
    rows.sort(key=lambda r: (-r.bytes_per_s, -r.samples_per_s, r.stream_id))
    return View(address, response.replica_id, now, tuple(rows), _clients(rows)), seen


def _clients(rows: Iterable[StreamRow]) -> tuple[ClientRow, ...]:
    groups: dict[tuple[str, str], list[StreamRow]] = {}
    for row in rows:
        groups.setdefault((row.identity, host_of(row.peer)), []).append(row)
    clients = [
        ClientRow(
            identity=identity,
            host=host,
            streams=len(members),
            samples=sum(r.samples for r in members),
            bytes=sum(r.bytes for r in members),
            samples_per_s=sum(r.samples_per_s for r in members),
            bytes_per_s=sum(r.bytes_per_s for r in members),
        )
        for (identity, host), members in groups.items()
    ]
    clients.sort(key=lambda c: (-c.bytes_per_s, -c.samples_per_s, c.identity, c.host))
    return tuple(clients)


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _client_cells(c: ClientRow) -> list[str]:
    return [
        c.identity or "-",
        c.host,
        str(c.streams),
        f"{c.samples_per_s:,.1f}",
        f"{c.bytes_per_s / _MB:,.1f}",
        f"{c.samples:,}",
        f"{c.bytes / _MB:,.1f}",
    ]


def _stream_cells(s: StreamRow) -> list[str]:
    return [
        s.stream_id,
        s.request_id,
        s.identity or "-",
        host_of(s.peer),
        s.method,
        s.dataset or "-",
        s.pattern or "-",
        _age(s.age_s),
        f"{s.samples_per_s:,.1f}",
        f"{s.bytes_per_s / _MB:,.1f}",
        f"{s.samples:,}",
        f"{s.bytes / _MB:,.1f}",
        f"{100 * s.wait_share:.0f}%",
    ]


CLIENT_HEADER = ["IDENTITY", "HOST", "STREAMS", "SAMPLES/S", "MB/S", "SAMPLES", "MB"]
STREAM_HEADER = [
    "STREAM",
    "REQUEST",
    "IDENTITY",
    "HOST",
    "METHOD",
    "DATASET",
    "PATTERN",
    "AGE",
    "SAMPLES/S",
    "MB/S",
    "SAMPLES",
    "MB",
    "WAIT",
]


def _summary(view: View) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(view.time_unix))
    replica = f" (replica {view.replica_id})" if view.replica_id else ""
    return (
        f"{view.address}{replica} at {when}: {len(view.streams)} streams, {len(view.clients)} clients, "
        f"{view.samples_per_s:,.1f} samples/s, {view.bytes_per_s / _MB:,.1f} MB/s"
    )


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_view(view: View) -> str:
    """The view as plain text: a summary line, the clients' table, the streams' table."""
    lines = [_summary(view)]
    if not view.streams:
        return "\n".join([*lines, "no open streams"])
    lines += ["", *_table([CLIENT_HEADER, *(_client_cells(c) for c in view.clients)])]
    lines += ["", *_table([STREAM_HEADER, *(_stream_cells(s) for s in view.streams)])]
    return "\n".join(lines)


def _rich_view(view: View) -> Any:
    from rich.console import Group
    from rich.table import Table

    numeric = {"STREAMS", "SAMPLES/S", "MB/S", "SAMPLES", "MB", "AGE", "WAIT"}

    def table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
        out = Table(title=title, title_justify="left", expand=False)
        for name in header:
            out.add_column(name, justify="right" if name in numeric else "left", no_wrap=True)
        for row in rows:
            out.add_row(*row)
        return out

    parts: list[Any] = [_summary(view)]
    if view.streams:
        parts.append(table("clients", CLIENT_HEADER, (_client_cells(c) for c in view.clients)))
        parts.append(table("streams", STREAM_HEADER, (_stream_cells(s) for s in view.streams)))
    else:
        parts.append("no open streams")
    return Group(*parts)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``top`` and its flags to the ``patchwire`` command's subparsers."""
    top = sub.add_parser("top", help="show a server's open streams and their throughput, live (admin role)")
    top.add_argument("address", help="the server, HOST:PORT")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one snapshot (rates since each stream started)")
    top.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for each answer (default 5)"
    )
    add_credential_flags(top)


def run(args: argparse.Namespace) -> int:
    """Runs ``patchwire top`` on this process's stdout and stderr."""
    return run_top(args)


def run_top(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Runs ``patchwire top``; returns the exit status (0, 1 on an error, 2 for a bad flag, 130 on Ctrl-C)."""
    import grpc

    from patchwire.client import Credentials, PatchwireError
    from patchwire.client._connection import Connection
    from patchwire.client._errors import translate_rpc_errors
    from patchwire.v1 import server_service_pb2, server_service_pb2_grpc

    out = out or sys.stdout
    err = err or sys.stderr
    if args.interval <= 0 or args.timeout <= 0:
        print("patchwire top: --interval and --timeout must be positive", file=err)
        return 2
    try:
        credentials = Credentials.from_args(args, environ)
    except (OSError, ValueError) as exc:
        print(f"patchwire top: credentials: {exc}", file=err)
        return 2
    connection = Connection(args.address, credentials)
    previous: Previous = {}

    def poll() -> View:
        nonlocal previous
        stub = server_service_pb2_grpc.ServerServiceStub(connection.channel)
        with translate_rpc_errors(f"listing the streams of {args.address}"):
            response = stub.ListStreams(server_service_pb2.ListStreamsRequest(), timeout=args.timeout)
        view, previous = view_of(response, args.address, previous)
        return view

    try:
        if args.once:
            out.write(format_view(poll()) + "\n")
            return 0
        with Interrupt() as stop:
            if out.isatty():
                _live(poll, args.interval, out, stop)
            else:
                first = True
                while True:
                    text = format_view(poll())
                    out.write(("" if first else "\n") + text + "\n")
                    out.flush()
                    first = False
                    if stop.wait(args.interval):
                        break
        return 130
    except PatchwireError as exc:
        print(f"patchwire top: {exc}", file=err)
        return 1
    except grpc.RpcError as exc:  # (never expected: translated above)
        print(f"patchwire top: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        connection.close()


def _live(poll: Any, interval: float, out: TextIO, stop: Interrupt) -> None:
    """Redraws the view in place until Ctrl-C (rich's Live; without rich, the screen is cleared between views)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:  # a client-only install: plain text, redrawn
        while True:
            out.write(_CLEAR + format_view(poll()) + "\n")
            out.flush()
            if stop.wait(interval):
                return
    console = Console(file=out)
    with Live(_rich_view(poll()), console=console, auto_refresh=False, screen=False) as live:
        while not stop.wait(interval):
            live.update(_rich_view(poll()), refresh=True)
