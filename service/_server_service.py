"""ServerService: what this server is (its replica id, version, serving processes, codecs) and the calls it serves
now (``patchwire top``)."""

from __future__ import annotations

import time
from importlib import metadata
from typing import TYPE_CHECKING, Any

from patchwire.service._calls import CallTable, current_call
from patchwire.service._errors import translate_errors
from patchwire.v1 import server_service_pb2 as spb
from patchwire.v1 import server_service_pb2_grpc
from patchwire.wire import compression

if TYPE_CHECKING:
    from patchwire.service._server import ServerConfig

__all__ = ["ServerServicer", "package_version"]


def package_version() -> str:
    """patchwire's installed version ("unknown" when run from a tree that is not installed)."""
    try:
        return metadata.version("patchwire")
    except metadata.PackageNotFoundError:
        return "unknown"


class ServerServicer(server_service_pb2_grpc.ServerServiceServicer):
    """Answers from the server's ``config`` (its replica id, processes and codecs) and ``streams``, the table of its
    process's open calls (which also reads its sibling processes' tables)."""

    def __init__(self, config: ServerConfig, streams: CallTable | None = None) -> None:
        self._config = config
        self._streams = streams if streams is not None else CallTable(config.worker_index, config.run_dir)
        self._replica_id = config.replica_id
        self._version = package_version()

    @translate_errors
    async def GetServerInfo(self, request: Any, context: Any) -> spb.GetServerInfoResponse:
        return spb.GetServerInfoResponse(
            replica_id=self._replica_id,
            version=self._version,
            # one process unless a supervisor started this one among others (run_dir: see ServerConfig)
            workers=self._config.workers if self._config.run_dir is not None else 1,
            worker_index=self._config.worker_index,
            compressions=[compression.codec_from_name(name) for name in self._config.compressions],
        )

    @translate_errors
    async def ListStreams(self, request: Any, context: Any) -> spb.ListStreamsResponse:
        now = time.time()
        return spb.ListStreamsResponse(
            streams=self._streams.snapshot(exclude=current_call()), time_unix=now, replica_id=self._replica_id
        )
