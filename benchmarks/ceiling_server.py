"""The gRPC ceiling's server: streams raw ``bytes`` messages, nothing else (used by ``benchmarks/bench.py``).

One server-streaming method, ``/patchwire.bench.Ceiling/Stream``, with identity serialisers: the request is
``b"COUNT,SIZE"`` and the reply is COUNT messages of SIZE bytes (the same immutable ``bytes`` object each time, so
the server does no per-message work beyond gRPC's own). It runs with the process settings ``patchwire serve`` uses:
``tune_malloc(arena_max=2)``, the message limits of ``framing.channel_options()``, ``grpc.aio`` on uvloop. Prints
``ceiling listening on 127.0.0.1:PORT`` once it serves and stops on SIGTERM/SIGINT, as ``patchwire serve`` does
(:func:`patchwire.cli.launch.announce_and_wait`).

Usage: ``python benchmarks/ceiling_server.py``
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import uvloop

from patchwire.cli.launch import announce_and_wait
from patchwire.wire import framing
from patchwire.wire.malloc import tune_malloc

SERVICE = "patchwire.bench.Ceiling"
METHOD = f"/{SERVICE}/Stream"


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    count, size = (int(part) for part in request.split(b","))
    payload = bytes(size)
    for _ in range(count):
        yield payload


async def _serve() -> None:
    server = grpc.aio.server(options=framing.channel_options())
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.unary_stream_rpc_method_handler(_stream)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await announce_and_wait(f"ceiling listening on 127.0.0.1:{port}")
    await server.stop(0.5)


def main() -> None:
    tune_malloc(arena_max=2)
    uvloop.run(_serve())


if __name__ == "__main__":
    main()
