"""Assembly jobs keep one owner when several processes serve one port: the home process (worker 0) holds every job,
and every other process forwards each AssemblyService call to it.

A forwarding process authenticates the caller first (the same gate as every other call, :func:`_auth.guarded`), then
relays the call's wire bytes, untouched, to the home's *internal* gRPC server on a Unix socket in the server's private
folder (``run_dir``, mode 0700: only the server's own user reaches it), carrying the caller's identity (name and roles)
in the ``patchwire-forwarded-identity-bin`` metadata. The internal server is the only place that reads that header
(:class:`ForwardedIdentities` is its gate); the public port's gate never looks at it, and a forwarding process drops a
copy a client sent before adding its own. Every call shape is relayed (unary, either stream, and the bidirectional
PostPredictions), with the caller's deadline, its other metadata (a request id, say), cancellation (a caller gone
cancels the forwarded call), and the home's status code, details, initial and trailing metadata on the way back.

Shared memory: the home also holds the one shared-memory socket of the server, so RegisterSharedMemory is forwarded
like every other assembly call and every region lives in the home, whatever it serves: posting and fetching subjects
(the home's own calls) and reading samples. A GetSamples call that names a region is therefore forwarded to the home
too (:class:`HomeDatasets`); GetSamples without one, and every other DatasetService call, is served where it arrives.
A client thus sees one socket path per server address, as with one process (its connection to that socket, its
regions and the leases of mapped volumes all belong to one process).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from patchwire.service._auth import ROLES, Authenticator, Identity, current_identity, gated_handlers
from patchwire.service._errors import PermissionDenied, Unauthenticated
from patchwire.service._limits import CallLimiter
from patchwire.wire import framing

__all__ = [
    "HOME_SOCKET",
    "IDENTITY_METADATA",
    "ForwardedIdentities",
    "HomeDatasets",
    "HomeLink",
    "decode_identity",
    "encode_identity",
    "home_socket",
    "start_home_server",
]

_log = logging.getLogger(__name__)

HOME_SOCKET = "home.sock"
"""The home's internal socket, in ``run_dir``."""
IDENTITY_METADATA = "patchwire-forwarded-identity-bin"
"""The metadata key of the caller's identity on forwarded calls (read on the home's internal socket only)."""
MAX_IDENTITY_BYTES = 4096
_DROPPED = frozenset({"authorization", IDENTITY_METADATA, "user-agent", "content-type", "te"})
"""Caller metadata not relayed: credentials (the identity stands for them), a forged identity, and HTTP/2 headers
gRPC sets itself."""


def home_socket(run_dir: Path) -> Path:
    """The path of the home's internal socket in the server's private folder."""
    return run_dir / HOME_SOCKET


def encode_identity(identity: Identity) -> bytes:
    return json.dumps({"name": identity.name, "roles": sorted(identity.roles)}).encode()


def decode_identity(data: bytes | str) -> Identity:
    """The identity a forwarding process sent; Unauthenticated for anything else."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        if len(raw) > MAX_IDENTITY_BYTES:
            raise ValueError("too long")
        value = json.loads(raw)
        name, roles = value["name"], value["roles"]
        if not isinstance(name, str) or not name or not isinstance(roles, list) or not set(roles) <= set(ROLES):
            raise ValueError("not an identity")
    except (ValueError, KeyError, TypeError):
        raise Unauthenticated(f"{IDENTITY_METADATA}: not an identity") from None
    return Identity(name, frozenset(roles))


@dataclass(frozen=True)
class ForwardedIdentities(Authenticator):
    """The gate of the home's internal server: the caller is the identity the forwarding process authenticated and
    named in :data:`IDENTITY_METADATA` (reachable only through the server's private folder); its role is checked
    again. Never the gate of a public port."""

    def authorize(self, context: Any, method: str, role: str | None) -> Identity:
        identity = None
        for key, value in context.invocation_metadata() or ():
            if key == IDENTITY_METADATA:
                identity = decode_identity(value)
        if identity is None:
            raise Unauthenticated(f"a forwarded call carries the caller's identity ({IDENTITY_METADATA})")
        if role is not None and not identity.has(role):
            raise PermissionDenied(f"{identity.name!r} lacks the {role!r} role that {method} needs")
        return identity


async def start_home_server(
    run_dir: Path,
    handlers: Sequence[grpc.GenericRpcHandler],
    options: Sequence[tuple[str, Any]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """The home's internal server on :func:`home_socket` (plaintext: the folder's mode is its protection), serving
    ``handlers`` (gated by :class:`ForwardedIdentities`) behind ``interceptors``."""
    path = home_socket(run_dir)
    path.unlink(missing_ok=True)  # a home that ended without stopping (killed) left it
    server = grpc.aio.server(options=list(options), interceptors=list(interceptors) or None)
    server.add_generic_rpc_handlers(tuple(handlers))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    return server


def _identity(data: bytes) -> bytes:
    return data


def _relayed_metadata(context: Any) -> list[tuple[str, str | bytes]]:
    """The caller's metadata for the home: without credentials, HTTP/2 headers or a forged identity, with the
    identity the gate found."""
    kept = [
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if key not in _DROPPED and not key.startswith((":", "grpc-"))
    ]
    return [*kept, (IDENTITY_METADATA, encode_identity(current_identity()))]


def _timeout(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.0)


async def _relay_end(context: Any, call: Any) -> None:
    """The home's trailing metadata, for a call that ended well."""
    trailing = await call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))


async def _relay_error(context: Any, exc: grpc.aio.AioRpcError) -> None:
    """Ends the caller's call as the home ended the forwarded one (code, details, trailing metadata)."""
    trailing = exc.trailing_metadata()
    await context.abort(exc.code(), exc.details() or "", tuple(trailing) if trailing else ())


async def _relay_start(context: Any, call: Any) -> None:
    initial = await call.initial_metadata()
    if initial:
        await context.send_initial_metadata(tuple(initial))


class HomeLink:
    """A forwarding process's channel to the home's internal socket in ``run_dir``. Calls wait for the home to be
    ready (a home that is starting or restarting), within the caller's deadline."""

    def __init__(self, run_dir: Path, options: Sequence[tuple[str, Any]] = ()) -> None:
        self._channel = grpc.aio.insecure_channel(
            f"unix:{home_socket(run_dir)}", options=[*framing.channel_options(), *options]
        )

    async def close(self) -> None:
        await self._channel.close()

    def forwarder(self, method: str, client_streaming: bool, server_streaming: bool) -> Callable[..., Any]:
        """A handler relaying ``method`` (``/package.Service/Method``) as wire bytes to the home."""
        channel = self._channel
        if not client_streaming and not server_streaming:
            unary_unary = channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)

            async def relay_unary_unary(request: bytes, context: Any) -> bytes | None:
                call = unary_unary(
                    request, timeout=_timeout(context), metadata=_relayed_metadata(context), wait_for_ready=True
                )
                return await _relay_response(context, call)

            return relay_unary_unary
        if not client_streaming:
            unary_stream = channel.unary_stream(method, request_serializer=_identity, response_deserializer=_identity)

            async def relay_unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                call = unary_stream(
                    request, timeout=_timeout(context), metadata=_relayed_metadata(context), wait_for_ready=True
                )
                async for response in _relay_stream(context, call):
                    yield response

            return relay_unary_stream
        if not server_streaming:
            stream_unary = channel.stream_unary(method, request_serializer=_identity, response_deserializer=_identity)

            async def relay_stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes | None:
                call = stream_unary(
                    requests, timeout=_timeout(context), metadata=_relayed_metadata(context), wait_for_ready=True
                )
                return await _relay_response(context, call)

            return relay_stream_unary
        stream_stream = channel.stream_stream(method, request_serializer=_identity, response_deserializer=_identity)

        async def relay_stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            call = stream_stream(
                requests, timeout=_timeout(context), metadata=_relayed_metadata(context), wait_for_ready=True
            )
            async for response in _relay_stream(context, call):
                yield response

        return relay_stream_stream

    def handlers(
        self, service_name: str, auth: Authenticator | None, limiter: CallLimiter | None
    ) -> grpc.GenericRpcHandler:
        """Every method of ``service_name`` forwarded to the home, each behind the caller's authentication and role
        gate and, with ``limiter``, this process's limits on concurrent calls (the home applies its own too)."""
        return gated_handlers(
            service_name,
            lambda m: self.forwarder(f"/{service_name}/{m.name}", m.client_streaming, m.server_streaming),
            auth,
            limiter,
            _identity,
        )


async def _relay_response(context: Any, call: Any) -> bytes | None:
    """The single response of a forwarded call (unary or client-streaming), with its metadata and status relayed to
    the caller; None where the home answered an error (which ``context`` then carries)."""
    try:
        response: bytes = await call
        await _relay_start(context, call)
        await _relay_end(context, call)
    except grpc.aio.AioRpcError as exc:
        await _relay_error(context, exc)
        return None
    finally:
        call.cancel()  # the caller is gone (its handler cancelled): so is the forwarded call
    return response


async def _relay_stream(context: Any, call: Any) -> AsyncIterator[bytes]:
    try:
        started = False
        async for response in call:
            if not started:
                started = True
                await _relay_start(context, call)
            yield response
        await _relay_end(context, call)
    except grpc.aio.AioRpcError as exc:
        await _relay_error(context, exc)
    finally:
        call.cancel()  # the caller went away mid-stream (the generator closed): the home stops too


class HomeDatasets:
    """DatasetService of a forwarding process: ``local`` serves every call, except GetSamples naming a shared-memory
    region, which ``link`` forwards to the home (where every region lives)."""

    _GET_SAMPLES = "/patchwire.v1.DatasetService/GetSamples"

    def __init__(self, local: Any, link: HomeLink) -> None:
        self._local = local
        self._forward = link.forwarder(self._GET_SAMPLES, client_streaming=False, server_streaming=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)

    async def GetSamples(self, request: Any, context: Any) -> AsyncIterator[Any]:
        if not request.HasField("shared_memory"):
            async for message in self._local.GetSamples(request, context):
                yield message
            return
        async for data in self._forward(request.SerializeToString(), context):
            yield data
