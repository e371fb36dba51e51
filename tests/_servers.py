"""Real patchwire servers for tests: in-process on a background event loop, or as a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from patchwire.service import PatchwireServer, ServerConfig


@contextmanager
def server_in_thread(datasets: Mapping[str, Path], **config: object) -> Iterator[PatchwireServer]:
    """A PatchwireServer on 127.0.0.1, port 0, running on its own event loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="patchwire-test-server", daemon=True)
    thread.start()
    server = PatchwireServer(ServerConfig(datasets=dict(datasets), host="127.0.0.1", port=0, **config))  # type: ignore[arg-type]
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@contextmanager
def server_subprocess(datasets: Mapping[str, Path], extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """``patchwire serve`` in a child process on a free port; yields its address."""
    args = [sys.executable, "-m", "patchwire.service", "--log-level", "WARNING", "serve", "--port", "0"]
    for name, path in datasets.items():
        args += ["--dataset", f"{name}={path}"]
    proc = subprocess.Popen([*args, *extra_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("patchwire listening on "):
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise RuntimeError(f"server did not start: {line!r} {err}")
        yield line.rsplit(" ", 1)[1].strip()
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
