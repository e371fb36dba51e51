"""The launcher and the announcement, with a stand-in child instead of a server: the address it reads, the stop it
makes, a child that does not announce itself, and the command line of ``patchwire serve``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from patchwire.cli import build_parser
from patchwire.cli.launch import LISTENING, launched, serve_command

WAIT_S = 30
ANNOUNCER = (
    "import asyncio, sys; from patchwire.cli.launch import announce_and_wait; "
    "asyncio.run(announce_and_wait('stand-in listening on 127.0.0.1:4321')); print('stopped', file=sys.stderr)"
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_announced_address_is_read_and_sigterm_stops_the_child() -> None:
    with launched(_python(ANNOUNCER), banner="stand-in listening on") as server:
        assert (server.address, server.port) == ("127.0.0.1:4321", 4321)
        assert server.process.poll() is None
    assert server.process.returncode == 0  # announce_and_wait returned on SIGTERM: a clean exit
    assert server.process.stderr is not None and server.process.stderr.closed


def test_a_child_the_caller_ended_is_left_alone() -> None:
    with launched(_python(ANNOUNCER), banner="stand-in listening on") as server:
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=WAIT_S) == 0
        assert server.process.stderr is not None
        assert server.process.stderr.read() == "stopped\n"


def test_a_child_that_ends_without_announcing_itself_is_an_error() -> None:
    code = "import sys; print('why', file=sys.stderr); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"did not start \(exit code 3\): '' why$"), launched(_python(code)):
        pytest.fail("the body must not run")


def test_a_child_that_prints_something_else_is_killed() -> None:
    code = "import time; print('something else', flush=True); time.sleep(600)"
    refused = pytest.raises(RuntimeError, match=r"did not start \(exit code -9\): 'something else\\n'$")
    with refused, launched(_python(code)):
        pytest.fail("the body must not run")


def test_stderr_can_go_elsewhere(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "w") as err, launched(_python(ANNOUNCER), "stand-in listening on", stderr=err) as server:
        assert server.process.stderr is None
    assert log.read_text() == "stopped\n"


def test_serve_command_picks_a_free_port_that_later_args_override(tmp_path: Path) -> None:
    h5 = tmp_path / "a.h5"
    h5.write_bytes(b"")
    command = serve_command({"a": h5}, "--verify", "--port", "4242")
    assert command[:3] == [sys.executable, "-m", "patchwire.cli"]
    assert command[3:] == [
        "--log-level",
        "WARNING",
        "serve",
        "--port",
        "0",
        "--workers",
        "1",
        "--dataset",
        f"a={h5}",
        "--verify",
        "--port",
        "4242",
    ]
    args = build_parser().parse_args(command[3:])
    assert (args.port, args.datasets, args.verify, args.workers) == (4242, [("a", h5)], True, 1)
    assert serve_command({}, log_level="INFO")[3:] == ["--log-level", "INFO", "serve", "--port", "0", "--workers", "1"]
    assert build_parser().parse_args(serve_command({}, "--workers", "3")[3:]).workers == 3


def test_the_serve_banner() -> None:
    assert LISTENING == "patchwire listening on"
    done = subprocess.run(
        [sys.executable, "-m", "patchwire.cli", "serve", "--help"], capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: patchwire serve")
