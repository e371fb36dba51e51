"""The link section's pieces: the rate-limited network namespace (root only) and the arithmetic and report of its
measurements (hand-made numbers; nothing here is timed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import _link
import pytest
from _link import (
    TARGET_VS_UNCOMPRESSED,
    UNCOMPRESSED,
    Snapshot,
    link_bytes,
    link_lines,
    link_targets,
    namespaces,
    network_namespace,
    plot_link,
    process_tree_cpu_s,
    qdisc,
    unavailable,
    window,
)
from _plan import SMOKE

needs_namespaces = pytest.mark.skipif(unavailable() is not None, reason=f"network namespaces: {unavailable()}")

#: Sends 4 MiB over TCP from a listener to a client on 127.0.0.1, both in this process, and prints the bytes.
TRANSFER = """
import socket, threading
server = socket.create_server(("127.0.0.1", 0))
payload = bytes(4 << 20)
def send():
    connection, _ = server.accept()
    with connection:
        connection.sendall(payload)
threading.Thread(target=send).start()
received = 0
with socket.create_connection(server.getsockname()) as client:
    while chunk := client.recv(1 << 20):
        received += len(chunk)
print(received)
"""


def _sent_bytes(namespace: str) -> int:
    shown = subprocess.run(
        ["tc", "-s", "-n", namespace, "qdisc", "show", "dev", "lo"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Sent (\d+) bytes", shown)
    assert match, shown
    return int(match.group(1))


@needs_namespaces
def test_a_transfer_in_the_namespace_crosses_its_filter_and_the_namespace_goes_away() -> None:
    with network_namespace("10gbit") as namespace:
        assert namespace in namespaces()
        shown = qdisc(namespace)
        assert shown.startswith("qdisc tbf") and "rate 10Gbit" in shown, shown
        before = _sent_bytes(namespace)
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", TRANSFER],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert int(done.stdout) == 4 << 20
        assert _sent_bytes(namespace) - before >= 4 << 20  # every byte went through the token bucket
    assert namespace not in namespaces()


@needs_namespaces
def test_without_a_rate_the_loopback_is_plain() -> None:
    with network_namespace(None) as namespace:
        assert "tbf" not in qdisc(namespace)
    assert namespace not in namespaces()


@needs_namespaces
def test_processes_left_inside_are_stopped_and_an_error_still_removes_it() -> None:
    with pytest.raises(KeyError), network_namespace("1gbit") as namespace:
        sleeper = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "60"])
        raise KeyError("failed mid-section")
    assert sleeper.wait(timeout=10) != 0  # terminated, not finished
    assert namespace not in namespaces()


def test_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_link.sys, "platform", "linux")
    monkeypatch.setattr(_link.os, "geteuid", lambda: 1000)
    assert "root" in (unavailable() or "")
    monkeypatch.setattr(_link.os, "geteuid", lambda: 0)
    monkeypatch.setattr(_link.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    assert unavailable() == "tc not found (install iproute2)"


def test_a_skipped_section_says_so_and_sets_no_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_link, "unavailable", lambda: "needs root for ip netns and tc")
    link = _link.bench_link(SMOKE, tmp_path, tmp_path / "logs")
    assert link == {"skipped": "needs root for ip netns and tc"}
    assert link_lines(link, SMOKE) == ["link (rate-limited network namespace): SKIPPED, needs root for ip netns and tc"]
    assert link_targets(link, SMOKE) == []
    plot_link(link, SMOKE, tmp_path / "link.png")
    assert not (tmp_path / "link.png").exists()
    assert list(tmp_path.iterdir()) == []  # no data generated either


def test_process_tree_cpu_counts_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cpu_s, processes = process_tree_cpu_s(os.getpid())
        assert cpu_s > 0 and processes >= 2
        assert process_tree_cpu_s(child.pid)[1] == 1
    finally:
        child.kill()
        child.wait()
    assert link_bytes() >= 0


def test_window_arithmetic() -> None:
    start = Snapshot(wall_s=10.0, client_cpu_s=1.0, server_cpu_s=2.0, link_bytes=1_000)
    end = Snapshot(wall_s=12.0, client_cpu_s=1.5, server_cpu_s=3.0, link_bytes=1_000 + 250_000_000)
    result = window(start, end, 1_000_000_000, 400)
    assert result["seconds"] == 2.0
    assert result["samples_per_s"] == 200.0
    assert result["gb_per_s"] == 0.5
    assert result["compression_ratio"] == 4.0
    assert result["link_gbit_per_s"] == 1.0
    assert result["server_cpu_s_per_gb"] == 1.0 and result["client_cpu_s_per_gb"] == 0.5


def _row(samples_per_s: float, gb_per_s: float, ratio: float) -> dict[str, Any]:
    return {
        "samples_per_s": samples_per_s,
        "gb_per_s": gb_per_s,
        "compression_ratio": ratio,
        "server_cpu_s_per_gb": 0.5,
        "client_cpu_s_per_gb": 0.25,
    }


def _ceiling(gb: list[float]) -> dict[str, Any]:
    return {"runs_gb_per_s": gb, "compression_ratio": 0.97, "server_cpu_s_per_gb": 0.3, "client_cpu_s_per_gb": 0.4}


def _measured() -> dict[str, Any]:
    compressed = "lz4_labels"
    streaming = {
        "axial": {UNCOMPRESSED.key: _row(1000, 1.0, 0.97), compressed: _row(1600, 1.6, 5.0)},
        "axis2": {UNCOMPRESSED.key: _row(1000, 1.0, 0.97), compressed: _row(1400, 1.4, 5.0)},
        "patches": {UNCOMPRESSED.key: _row(100, 1.0, 0.97), compressed: _row(150, 1.5, 5.0)},
    }
    return {
        "skipped": None,
        "rate": "10gbit",
        "qdisc": "qdisc tbf 8001: root refcnt 2 rate 10Gbit burst 4Mb lat 50ms",
        "budget_s": 4.0,
        "data": {
            "subjects": 2,
            "shape": [24, 40, 36],
            "image_zero_fraction": 0.8,
            "labelled_fraction": 0.15,
            "file_mb": 1.0,
        },
        "codecs": [{"key": "none", "label": "uncompressed"}, {"key": compressed, "label": "lz4 labels"}],
        "link": {
            "ceiling_before": _ceiling([1.0, 1.2]),
            "ceiling_after": _ceiling([0.8, 1.4]),
            "streaming": streaming,
            "assembly": {
                "slice": {"label": "slice-wise", "warmup_seconds": 1.0, UNCOMPRESSED.key: _row(500, 1.0, 0.97)}
            },
            "server_processes": 1,
        },
        "loopback": {
            "ceiling_before": _ceiling([2.0]),
            "ceiling_after": _ceiling([2.0]),
            "streaming": {k: {c: dict(r) for c, r in rows.items()} for k, rows in streaming.items()},
        },
    }


def test_rows_against_uncompressed_and_raw_grpc_and_the_goal(tmp_path: Path) -> None:
    link = _measured()
    _link._derive(link)
    part = link["link"]
    assert part["ceiling_gb_per_s"] == pytest.approx(1.1)  # median of 0.8, 1.0, 1.2, 1.4
    axial = part["streaming"]["axial"]
    assert axial["lz4_labels"]["vs_uncompressed"] == pytest.approx(1.6)
    assert axial["lz4_labels"]["vs_raw_grpc"] == pytest.approx(1.6 / 1.1)
    assert axial["lz4_labels"]["goal_met"] is True and axial["none"]["goal_met"] is None
    assert part["streaming"]["axis2"]["lz4_labels"]["goal_met"] is False
    assert part["assembly"]["slice"]["none"]["vs_uncompressed"] == 1.0

    targets = link_targets(link, SMOKE)
    assert [(t["value"], t["passed"]) for t in targets] == [
        (pytest.approx(1.6), True),
        (pytest.approx(1.4), False),
        (pytest.approx(1.5), True),
    ]
    assert all(t["threshold"] == TARGET_VS_UNCOMPRESSED for t in targets)
    assert targets[0]["name"] == "10gbit link, axial slices (axis 0): lz4 labels / uncompressed (samples/s)"

    lines = link_lines(link, SMOKE)
    text = "\n".join(lines)
    assert "80.0% of image values zero" in text and "rate 10Gbit" in text
    axial_row = next(line for line in lines if "link     axial slices" in line and "lz4 labels" in line)
    assert axial_row.split()[-8:] == ["1600", "1.60", "1.45x", "5.00x", "1.60x", "0.50", "0.25", "yes"]
    assert any("loopback raw gRPC, 1 MiB messages" in line and "2.00" in line for line in lines)
    assert any("assembly, slice-wise" in line for line in lines)

    plot_link(link, SMOKE, tmp_path / "link.png")
    assert (tmp_path / "link.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
