"""Units of the supervisor of several serving processes: how many it starts, how long it waits before starting a
failing one again, the port it reserves for them (real sockets on 127.0.0.1) and its private folder. The processes
themselves run in tests/integration/test_workers.py."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from patchwire.service import _workers
from patchwire.service._workers import (
    AUTO_MAX,
    BACKOFF_MAX_S,
    cgroup_cpu_limit,
    make_run_dir,
    reserve_port,
    restart_delay,
    usable_cpus,
    worker_count,
)


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (6, 6), (8, 8), (64, AUTO_MAX)])
def test_zero_workers_is_one_per_usable_cpu_up_to_the_cap(cpus: int, expected: int) -> None:
    assert worker_count(0, lambda: cpus) == expected


def test_a_number_of_workers_is_taken_as_given() -> None:
    assert worker_count(1, lambda: 64) == 1
    assert worker_count(12, lambda: 2) == 12  # beyond the cap or the CPUs, when asked for


def test_a_negative_number_of_workers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"workers: 0 \(one per CPU\) or more, got -1"):
        worker_count(-1)


def test_usable_cpus_are_this_processs_affinity_without_a_cgroup_limit(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path, tmp_path / "no-cgroup") == len(os.sched_getaffinity(0))


def test_restarts_wait_longer_while_a_worker_keeps_failing() -> None:
    assert restart_delay(0) == 0.0  # a worker that had served a while: at once
    assert [restart_delay(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == BACKOFF_MAX_S


def test_port_zero_is_reserved_as_a_real_port_that_workers_can_share() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    try:
        port = reserved.getsockname()[1]
        assert port > 0
        assert reserved.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        # a worker binds the same port with SO_REUSEPORT (as gRPC does with grpc.so_reuseport) and serves on it
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                accepted, _ = worker.accept()
                accepted.close()
    finally:
        reserved.close()


def test_a_port_in_use_is_refused_not_shared() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}: Address already in use"):
            reserve_port("127.0.0.1", port)
    with socket.socket() as sharing:  # another server that would share it (SO_REUSEPORT, same user) is refused too
        sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sharing.bind(("127.0.0.1", 0))
        sharing.listen()
        port = sharing.getsockname()[1]
        with pytest.raises(OSError, match="Address already in use") as refused:
            reserve_port("127.0.0.1", port)
        assert refused.value.errno == 98


def test_the_run_folder_is_private() -> None:
    run_dir = make_run_dir()
    try:
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert run_dir.name.startswith("patchwire-run-")
        assert len(os.fsencode(run_dir / "home.sock")) < 108
    finally:
        run_dir.rmdir()


def test_a_long_temporary_folder_gives_way_to_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    long = os.path.join("/tmp", "x" * 90)
    os.makedirs(long, exist_ok=True)
    try:
        monkeypatch.setattr(_workers.tempfile, "tempdir", long)
        run_dir = make_run_dir()
        assert str(run_dir.parent) == "/tmp"
        run_dir.rmdir()
    finally:
        os.rmdir(long)


def test_a_workers_report_is_one_bounded_line() -> None:
    read, write = os.pipe()
    try:
        _workers._report(write, "error first line\nsecond   line " + "x" * 10_000)
        data = os.read(read, 1 << 16)
    finally:
        os.close(read)
        os.close(write)
    assert data.startswith(b"error first line second line x") and data.endswith(b"\n")
    assert data.count(b"\n") == 1 and len(data) <= _workers._MESSAGE_MAX + 1


def _cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self").write_text(own)
    return root, tmp_path / "self"


@pytest.mark.parametrize(
    ("own", "files", "limit"),
    [
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "400000 100000\n"}, 4.0),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # inside a container: its own cgroup at the root
        ("0::/x\n", {"cpu.max": "max 100000\n"}, None),
        (
            "3:cpu,cpuacct:/docker/abc\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            2.0,
        ),
        ("3:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
        ("0::/\n", {}, None),
    ],
)
def test_a_cgroups_cpu_limit_is_read_in_cpus(
    tmp_path: Path, own: str, files: dict[str, str], limit: float | None
) -> None:
    assert cgroup_cpu_limit(*_cgroup(tmp_path, own, files)) == limit


def test_usable_cpus_are_at_most_the_cgroups_limit_rounded_down(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(*_cgroup(tmp_path, "0::/\n", {"cpu.max": f"{affinity * 100000 + 50000} 100000"})) == affinity
    assert usable_cpus(*_cgroup(tmp_path / "a", "0::/\n", {"cpu.max": "50000 100000"})) == 1
    assert usable_cpus(*_cgroup(tmp_path / "b", "0::/\n", {"cpu.max": "max 100000"})) == affinity
    assert usable_cpus(tmp_path / "none", tmp_path / "missing") == affinity
