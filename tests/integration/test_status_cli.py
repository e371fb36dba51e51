"""``patchwire status``: the command runs as a child process against a real server (in-process here, on port 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service import PatchwireServer

from _servers import child_env, server_in_thread

EXIT_TIMEOUT_S = 30
SLICE = (24, 16)  # tiny_h5: 3 subjects of 20x24x16; SliceIndexing gives 20 samples per subject


def _status_args(address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "patchwire.cli", "status", address, *args]


def _status(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _status_args(address, *args), capture_output=True, text=True, env=child_env(), timeout=EXIT_TIMEOUT_S
    )


def _watch(address: str, *args: str) -> subprocess.Popen[bytes]:
    """``patchwire status ADDRESS ARGS --watch``; unbuffered on this side, so that reading its first line with
    ``readline`` leaves the rest for ``communicate``."""
    return subprocess.Popen(
        _status_args(address, *args, "--watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        env=child_env(),
    )


def _first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().decode()


def _communicate(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    return out.decode(), err.decode()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kills a watch that a failed test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _post(assembler: pw.RemoteSubjectAssembler, indices: list[int]) -> None:
    assembler.add_batch({"seg": np.zeros((len(indices), *SLICE, 1), np.float32)}, indices)


@pytest.fixture(scope="module")
def server(tiny_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PatchwireServer]:
    with server_in_thread({"tiny": tiny_h5}, state_dir=tmp_path_factory.mktemp("state")) as srv:
        yield srv


@pytest.fixture(scope="module")
def partial(server: PatchwireServer) -> Iterator[str]:
    """Job 'partial': subject 0 complete, subject 1 with 2 of 20 samples, subject 2 with none (22 of 60)."""
    with pw.connect(server.address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing())
        with client.assembler(ds, overlap="average", job_id="partial", entries={"seg": 1}) as assembler:
            _post(assembler, list(range(0, 11)))
            _post(assembler, list(range(11, 22)))
        yield "partial"


def _assembler(server: PatchwireServer, job_id: str) -> tuple[pw.Client, pw.RemoteSubjectAssembler]:
    client = pw.connect(server.address)
    ds = client.datasource("tiny", extr.SliceIndexing())
    return client, client.assembler(ds, job_id=job_id, entries={"seg": 1})


def test_table_lists_every_job_with_its_progress(server: PatchwireServer, partial: str) -> None:
    result = _status(server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["JOB", "DATASET", "STATE", "OVERLAP", "KEPT", "SUBJECTS", "SAMPLES", "PROGRESS"]
    (row,) = [line for line in lines if line.startswith(f"{partial} ")]
    assert row.split() == [
        partial,
        "tiny",
        "active",
        "average",
        "journal",
        "1/3",
        "22/60",
        "[#######-------------]",
        "36%",
    ]
    assert lines[0].index("PROGRESS") == row.index("[")  # columns line up


def test_job_lists_every_subject(server: PatchwireServer, partial: str) -> None:
    result = _status(server.address, "--job", partial)
    assert result.returncode == 0, result.stderr
    head, header, *subjects = result.stdout.splitlines()
    assert head == (
        "job partial on tiny: active, overlap average, journalled, 1/3 subjects ready, 22/60 samples  "
        "[#######-------------]  36%"
    )
    assert header.split() == ["#", "SUBJECT", "PROGRESS", "SAMPLES", "STATE", "MISSING"]
    assert [line.split() for line in subjects] == [
        ["0", "Subject_1", "[####################]", "100%", "20/20", "ready", "0"],
        ["1", "Subject_2", "[##------------------]", "10%", "2/20", "in_progress", "18"],
        ["2", "Subject_3", "[--------------------]", "0%", "0/20", "pending", "20"],
    ]


def test_watch_ends_when_the_job_completes(server: PatchwireServer) -> None:
    client, assembler = _assembler(server, "watched")
    with client, assembler:
        _post(assembler, list(range(0, 30)))
        watch = _watch(server.address, "--job", "watched", "--interval", "0.05")
        try:
            first = _first_line(watch)  # the first snapshot is out: the watch runs
            assert first.startswith("job watched on tiny: active,"), first
            assert watch.poll() is None
            _post(assembler, list(range(30, 60)))
            out, err = _communicate(watch)
        finally:
            _reap(watch)
    assert watch.returncode == 0, err
    assert "\x1b" not in out  # not a terminal: successive snapshots, no screen control
    snapshots = (first + out).split("\n\n")
    assert len(snapshots) >= 2
    assert snapshots[0].startswith("job watched on tiny: active, overlap overwrite, journalled, 1/3 subjects ready")
    assert len(snapshots[0].splitlines()) == 5  # the job, a header, three subjects
    last = snapshots[-1].splitlines()
    assert last[0] == (
        "job watched on tiny: completed, overlap overwrite, journalled, 3/3 subjects ready, 60/60 samples  "
        "[####################] 100%"
    )
    assert [line.split()[4:] for line in last[2:]] == [["20/20", "ready", "0"]] * 3


def test_jobs_of_a_server_without_a_state_folder_are_kept_in_memory(tiny_h5: Path) -> None:
    with server_in_thread({"tiny": tiny_h5}) as srv:
        client, assembler = _assembler(srv, "ephemeral")
        with client, assembler:
            _post(assembler, list(range(20)))
            table = _status(srv.address)
            job = _status(srv.address, "--job", "ephemeral")
    assert table.returncode == 0 and job.returncode == 0, table.stderr + job.stderr
    header, row = table.stdout.splitlines()
    assert row.split()[header.split().index("KEPT")] == "memory"
    assert job.stdout.startswith("job ephemeral on tiny: active, overlap overwrite, in memory, 1/3 subjects ready")


def test_watch_of_every_job_ends_when_all_are_finished(tiny_h5: Path, tmp_path: Path) -> None:
    with server_in_thread({"tiny": tiny_h5}, state_dir=tmp_path / "state") as srv:
        done_client, done = _assembler(srv, "done")
        dropped_client, dropped = _assembler(srv, "dropped")
        with done_client, done, dropped_client, dropped:
            watch = _watch(srv.address, "--interval", "0.05")
            try:
                assert _first_line(watch).split()[0] == "JOB"
                _post(done, list(range(60)))
                dropped.abort()
                out, err = _communicate(watch)
            finally:
                _reap(watch)
    assert watch.returncode == 0, err
    rows = {line.split()[0]: line.split()[2] for line in out.split("\n\n")[-1].splitlines()[1:]}
    assert rows == {"done": "completed", "dropped": "aborted"}


def test_watch_redraws_on_a_terminal(server: PatchwireServer, partial: str) -> None:
    client, assembler = _assembler(server, "on-a-tty")
    with client, assembler:
        _post(assembler, list(range(60)))
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen(
            _status_args(server.address, "--job", "on-a-tty", "--watch"),
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        os.close(follower)
        _, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and everything was read
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, err
    text = output.decode()
    assert text.startswith("\x1b[H\x1b[J")  # cleared and redrawn in place
    assert "job on-a-tty on tiny: completed" in text


def test_ctrl_c_ends_the_watch_quietly(server: PatchwireServer, partial: str) -> None:
    watch = _watch(server.address, "--job", partial, "--interval", "0.05")
    try:
        assert _first_line(watch).startswith(f"job {partial} on tiny: active")
        watch.send_signal(signal.SIGINT)
        _, err = _communicate(watch)
    finally:
        _reap(watch)
    assert watch.returncode == 130
    assert "Traceback" not in err


def test_unknown_job_is_an_error(server: PatchwireServer, partial: str) -> None:
    result = _status(server.address, "--job", "nope")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "unknown assembly job 'nope'" in result.stderr
    assert result.stderr.startswith("patchwire status: ")
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_an_error() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _status(f"127.0.0.1:{port}", "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"patchwire status: no patchwire server answered at 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


def test_interval_must_be_positive(server: PatchwireServer) -> None:
    result = _status(server.address, "--watch", "--interval", "0")
    assert result.returncode == 2
    assert "--interval must be positive" in result.stderr
