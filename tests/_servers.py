"""Real patchwire servers for tests: in-process on a background event loop, or as a subprocess (started by
:mod:`patchwire.cli.launch`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from patchwire.cli.launch import launch_server, serve_command
from patchwire.service import PatchwireServer, ServerConfig
from patchwire.v1 import spec_pb2

T = TypeVar("T")


def slices_spec() -> spec_pb2.DatasourceSpec:
    """The images of the ``tiny`` dataset (conftest's ``tiny_h5``), one sample per slice along axis 0."""
    spec = spec_pb2.DatasourceSpec(
        dataset="tiny", extractor=spec_pb2.Extractor(data=spec_pb2.DataExtractor(categories=["images"]))
    )
    spec.indexing_strategy.slice.slice_axis.append(0)
    return spec


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
    return serve_command(datasets, *extra_args)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


@contextmanager
def serve_process(
    datasets: Mapping[str, Path], extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``patchwire serve`` in a child process on a free port (:func:`patchwire.cli.launch.launch_server`, stderr
    piped); yields the process and its address. The child is terminated on exit unless the test already ended it."""
    with launch_server(datasets, extra_args, env=child_env()) as server:
        yield server.process, server.address


@contextmanager
def server_subprocess(datasets: Mapping[str, Path], extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """``patchwire serve`` in a child process on a free port; yields its address."""
    with serve_process(datasets, extra_args) as (_, address):
        yield address
