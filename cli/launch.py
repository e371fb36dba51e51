"""A server in a child process, and the one line by which it says it is ready.

Both sides of one small protocol live here. A server prints ``<banner> HOST:PORT`` on stdout, flushed, once it
serves and its SIGINT/SIGTERM handlers are in place, then runs until one of those signals
(:func:`announce_and_wait`). Whoever started it reads that line (:func:`launched`), so it knows the address of a
server bound to port 0 and may stop it at once with SIGTERM.

:func:`launch_server` runs ``patchwire serve`` that way for tests, the benchmark and ``patchwire demo``::

    with launch_server({"brains": Path("brains.h5")}, ["--state-dir", "state"]) as server:
        client = pw.connect(server.address)
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["LISTENING", "Launched", "announce_and_wait", "launch_server", "launched", "serve_command"]

LISTENING = "patchwire listening on"
"""What ``patchwire serve`` prints before its address once it serves."""
STOP_TIMEOUT_S = 30.0
"""How long a server gets to exit after SIGTERM before it is killed."""


@dataclass(frozen=True)
class Launched:
    """A started server: its process (to signal, wait for or read stderr from) and the address it announced."""

    process: subprocess.Popen[str]
    address: str

    @property
    def port(self) -> int:
        """The announced port (to start a server again on the same one: ``--port``)."""
        return int(self.address.rsplit(":", 1)[1])


async def announce_and_wait(line: str) -> None:
    """Installs SIGINT and SIGTERM handlers on the running loop, prints ``line`` (the announcement), and returns on
    the first of those signals. Announced only once the handlers are in place: whoever reads the line may stop the
    server at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(line, flush=True)
    await stop.wait()


def serve_command(datasets: Mapping[str, Path], *args: str, log_level: str = "WARNING") -> list[str]:
    """The command line of ``patchwire serve`` on a free port for ``datasets`` (name -> file), as one serving process,
    then ``args``: a ``--port`` among them overrides the free port (a restart on the same one), a ``--workers`` the
    single process (tests and benchmarks get one process unless they ask for more, whatever the machine's CPUs)."""
    command = [sys.executable, "-m", "patchwire.cli", "--log-level", log_level, "serve", "--port", "0"]
    command += ["--workers", "1"]
    for name, path in datasets.items():
        command += ["--dataset", f"{name}={path}"]
    return [*command, *args]


@contextmanager
def launched(
    command: Sequence[str],
    banner: str = LISTENING,
    env: Mapping[str, str] | None = None,
    stderr: int | IO[str] | None = subprocess.PIPE,
) -> Iterator[Launched]:
    """Starts ``command``, reads its first line of stdout, and yields the server once that line is ``<banner>
    ADDRESS``; ``env``: the child's environment (None: this one's); ``stderr``: where the child's goes (a pipe by
    default, readable from ``process.stderr``; None: this process's). On exit the child gets SIGTERM (then SIGKILL
    after :data:`STOP_TIMEOUT_S`) unless it has already ended; its pipes are closed.

    Raises RuntimeError when the first line is anything else (the child is killed unless it closed its stdout; the
    message holds its exit code and what it wrote to a ``stderr`` pipe)."""
    proc = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=stderr, text=True, env=None if env is None else dict(env)
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(f"{banner} "):
            if line:  # something else on stdout: it may still run
                proc.kill()
            _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
            raise RuntimeError(
                f"{shlex.join(command)} did not start (exit code {proc.returncode}): {line!r} {err or ''}".rstrip()
            )
        yield Launched(proc, line.rsplit(" ", 1)[1].strip())
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def launch_server(
    datasets: Mapping[str, Path],
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stderr: int | IO[str] | None = subprocess.PIPE,
    log_level: str = "WARNING",
) -> Iterator[Launched]:
    """``patchwire serve`` in a child process on a free port (:func:`serve_command`), started and stopped by
    :func:`launched`."""
    with launched(serve_command(datasets, *args, log_level=log_level), env=env, stderr=stderr) as server:
        yield server
