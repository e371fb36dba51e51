"""Real patchwire servers for tests: in-process on a background event loop, or as a subprocess."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from patchwire.service import PatchwireServer, ServerConfig

T = TypeVar("T")


@dataclass(frozen=True)
class ThreadedServer:
    """A PatchwireServer and the event loop (on its own thread) that runs it."""

    server: PatchwireServer
    loop: asyncio.AbstractEventLoop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules ``coro`` on the server's loop; the caller waits on the future (with a timeout)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


@contextmanager
def threaded_server(datasets: Mapping[str, Path], **config: object) -> Iterator[ThreadedServer]:
    """A PatchwireServer on 127.0.0.1, port 0, running on its own event loop thread; stopped on exit (stop is
    idempotent, so a test may stop it earlier through ``submit(server.stop())``)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="patchwire-test-server", daemon=True)
    thread.start()
    server = PatchwireServer(ServerConfig(datasets=dict(datasets), host="127.0.0.1", port=0, **config))
    handle = ThreadedServer(server, loop)
    try:
        handle.submit(server.start()).result(timeout=30)
        yield handle
    finally:
        handle.submit(server.stop(0.5)).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@contextmanager
def server_in_thread(datasets: Mapping[str, Path], **config: object) -> Iterator[PatchwireServer]:
    """A PatchwireServer on 127.0.0.1, port 0, running on its own event loop thread."""
    with threaded_server(datasets, **config) as handle:
        yield handle.server


def serve_args(datasets: Mapping[str, Path], *extra_args: str) -> list[str]:
    """The command line of ``patchwire serve`` on a free port for ``datasets``."""
    args = [sys.executable, "-m", "patchwire.service", "--log-level", "WARNING", "serve", "--port", "0"]
    for name, path in datasets.items():
        args += ["--dataset", f"{name}={path}"]
    return [*args, *extra_args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


@contextmanager
def serve_process(
    datasets: Mapping[str, Path], extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``patchwire serve`` in a child process on a free port; yields the process and its address. The child is
    terminated on exit unless the test already ended it."""
    proc = subprocess.Popen(
        serve_args(datasets, *extra_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("patchwire listening on "):
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise RuntimeError(f"server did not start: {line!r} {err}")
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def server_subprocess(datasets: Mapping[str, Path], extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """``patchwire serve`` in a child process on a free port; yields its address."""
    with serve_process(datasets, extra_args) as (_, address):
        yield address
