"""Section a, the ceiling: raw gRPC server streaming of 1 MiB ``bytes`` messages over loopback from
``ceiling_server.py`` in a child process, measured before patchwire's streaming and again after it."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from _launch import logged_server
from _machine import peak_rss_mb
from _plan import CEILING_MESSAGE_BYTES, CEILING_METHOD, HERE, MB, Mode

from patchwire.wire import framing

CEILING_BANNER = "ceiling listening on"


def bench_ceiling(mode: Mode, logs: Path) -> dict[str, Any]:
    args = [sys.executable, str(HERE / "ceiling_server.py")]
    with logged_server(args, logs / "ceiling-server.log", CEILING_BANNER) as server:
        channel = grpc.insecure_channel(server.address, options=framing.channel_options())
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
        server_peak = peak_rss_mb(server.process.pid)
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
