"""gRPC channels that survive ``fork()``: opened lazily per process and closed in the parent before a fork.

gRPC's state is invalid in a forked child while the parent holds a live channel (calls fail with "Wrong file
descriptor generation"). torch DataLoader workers are forked, so every patchwire object that talks to a server
keeps its channel in a :class:`Connection`: the channel is closed right before any fork and reopened on first use
in whichever process uses it next. Pickling a Connection keeps only the target, its credentials and timeouts.

A connection's target is one server or several replicas (:mod:`patchwire.client._replicas`): over several, its one
channel balances calls over them with gRPC's ``round_robin``.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from patchwire.client import _page_pool
from patchwire.client._credentials import Credentials
from patchwire.client._errors import DeadlineExceeded, ServerUnavailable, from_grpc
from patchwire.client._retry import RECONNECT_OPTIONS
from patchwire.client._timeouts import Timeouts
from patchwire.v1 import (
    assembly_service_pb2,
    assembly_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
)
from patchwire.wire import framing
from patchwire.wire.malloc import tune_client_process

if TYPE_CHECKING:
    from patchwire.client._replicas import Target

__all__ = ["Connection"]

_live: weakref.WeakSet[Connection] = weakref.WeakSet()
_live_lock = threading.Lock()


class Connection:
    """The channel to ``address``: one server's ``HOST:PORT`` (or any target gRPC takes), several replicas (a list
    or a comma-separated string of ``HOST:PORT``), ``dns:///NAME:PORT``, or a parsed
    :class:`~patchwire.client._replicas.Target`; ``address`` then reads as the target (``a:1,b:2``)."""

    def __init__(
        self,
        address: str | Sequence[str] | Target,
        credentials: Credentials | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        from patchwire.client._replicas import Target, parse_target  # (that module builds on this one)

        self.target = address if isinstance(address, Target) else parse_target(address)
        """Where the calls go: one server or several replicas."""
        self.address = str(self.target)
        self.credentials = credentials or Credentials()
        """TLS and identification for every channel this connection opens."""
        self.timeouts = timeouts or Timeouts()
        """Deadlines of this connection's calls and its channel's keepalive."""
        self._channel: grpc.Channel | None = None
        self._stub: dataset_service_pb2_grpc.DatasetServiceStub | None = None
        self._assembly: assembly_service_pb2_grpc.AssemblyServiceStub | None = None
        self._raw: dict[str, Any] = {}
        self._pid = -1
        self._lock = threading.Lock()
        with _live_lock:
            _live.add(self)

    @property
    def replicated(self) -> bool:
        """Whether calls are balanced over several replicas (a list of addresses or a DNS name): state that lives on
        one server (shared-memory regions, assembly jobs) is then reached through a direct connection to it."""
        return self.target.replicated

    @property
    def buffers(self) -> _page_pool.ProcessBuffers:
        """Payload buffers of this connection's streams: the process's pool, recycled across calls and connections
        (made when first needed: a client that never receives a large payload over the wire maps no reserve)."""
        return _page_pool.PROCESS_BUFFERS

    @property
    def channel(self) -> grpc.Channel:
        self._ensure()
        assert self._channel is not None
        return self._channel

    @property
    def datasets(self) -> dataset_service_pb2_grpc.DatasetServiceStub:
        self._ensure()
        assert self._stub is not None
        return self._stub

    @property
    def assembly(self) -> assembly_service_pb2_grpc.AssemblyServiceStub:
        self._ensure()
        assert self._assembly is not None
        return self._assembly

    def raw_stream(self, method: str) -> Any:
        """A server-streaming call of ``method`` (e.g. ``/patchwire.v1.DatasetService/StreamBatches``) whose
        responses arrive as wire bytes: chunk messages are then read without protobuf's copy (``_decoding``)."""
        self._ensure()
        call = self._raw.get(method)
        if call is None:
            call = self._raw[method] = self.channel.unary_stream(
                method, request_serializer=framing.passthrough_serializer, response_deserializer=_identity
            )
        return call

    def post_predictions(self) -> Any:
        """The PostPredictions call, taking messages or pre-serialised request bytes."""
        self._ensure()
        call = self._raw.get("post")
        if call is None:
            call = self._raw["post"] = self.channel.stream_stream(
                "/patchwire.v1.AssemblyService/PostPredictions",
                request_serializer=framing.passthrough_serializer,
                response_deserializer=assembly_service_pb2.PostPredictionsResponse.FromString,
            )
        return call

    def _ensure(self) -> None:
        if self._channel is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._channel is None or self._pid != os.getpid():
                tune_client_process()
                options = [*framing.channel_options(), *RECONNECT_OPTIONS, *self.timeouts.channel_options()]
                self._channel = self._new_channel(options)
                self._stub = dataset_service_pb2_grpc.DatasetServiceStub(self._channel)
                self._assembly = assembly_service_pb2_grpc.AssemblyServiceStub(self._channel)
                self._raw = {}
                self._pid = os.getpid()

    def _new_channel(self, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A new channel to the target with ``options`` and the target's own (load balancing, certificate name)."""
        target_options = self.target.channel_options(self.credentials.secure)
        return self.credentials.channel(self.target.channel_target(), [*options, *target_options])

    def wait_ready(self, timeout: float, wait_for_server: bool = False) -> None:
        """Checks that the server answers (a ListDatasets call) within ``timeout`` seconds.

        A refused connection (nothing listens) fails at once with ServerUnavailable, unless ``wait_for_server``:
        then the call waits up to ``timeout`` for a server that is still starting. A server that accepts the
        connection but does not answer fails with DeadlineExceeded after ``timeout``. Unlike
        ``grpc.channel_ready_future`` this starts no polling thread, which would still be inside gRPC when a
        DataLoader forks its workers. A server that refuses the call for want of a role (PERMISSION_DENIED) has
        answered: the connection is ready for what the caller may do.
        """
        try:
            self.datasets.ListDatasets(
                dataset_service_pb2.ListDatasetsRequest(), timeout=timeout, wait_for_ready=wait_for_server
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                waited = f" within {timeout:g} s" if wait_for_server else ""
                raise ServerUnavailable(
                    f"no patchwire server answered at {self.address}{waited} ({exc.code().name}: {exc.details()})"
                ) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(
                    f"the patchwire server at {self.address} did not answer within {timeout:g} s (DEADLINE_EXCEEDED)"
                ) from None
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                return
            raise from_grpc(exc, f"connecting to {self.address}") from exc

    def close(self) -> None:
        """Closes the channel (idempotent); the next use opens a new one."""
        with self._lock:
            channel, self._channel, self._stub, self._assembly = self._channel, None, None, None
        if channel is not None and self._pid == os.getpid():
            channel.close()

    def _forget(self) -> None:
        """In a forked child: drop the inherited channel without touching it."""
        self._channel, self._stub, self._assembly, self._pid = None, None, None, -1
        self._lock = threading.Lock()

    def reopened(self, timeouts: Timeouts | None = None) -> Connection:
        """A new connection to the same server with the same credentials (and timeouts, unless given)."""
        return Connection(self.target, self.credentials, timeouts or self.timeouts)

    def __getstate__(self) -> dict[str, Any]:
        return {"address": self.target, "credentials": self.credentials, "timeouts": self.timeouts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["address"], state.get("credentials"), state.get("timeouts"))  # type: ignore[misc]


def _identity(data: bytes) -> bytes:
    return data


def _before_fork() -> None:
    # Unreachable gRPC objects (finished calls of a stream held in a reference cycle, say) must be destroyed here:
    # if the garbage collector first finds them in the child, their finalizers call into gRPC there and crash it.
    gc.collect()
    with _live_lock:
        connections = list(_live)
    for c in connections:
        c.close()


def _after_fork_in_child() -> None:
    global _live_lock
    _live_lock = threading.Lock()
    for c in list(_live):
        c._forget()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
