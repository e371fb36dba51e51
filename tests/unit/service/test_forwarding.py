"""Forwarding to the home process: the identity header and the gate that trusts it (on the internal socket only), the
metadata that is relayed, and the relay itself for all four call shapes between two real in-process gRPC servers
(a front on TCP and a home on a Unix socket): bytes, status codes, details, trailing metadata, deadlines and
cancellation arrive as the home sent them."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from patchwire.service import _forwarding
from patchwire.service._auth import (
    ANONYMOUS,
    HANDLER_OF_SHAPE,
    READ,
    WRITE,
    Authenticator,
    Identity,
    guarded,
    serving_as,
    token_digest,
)
from patchwire.service._errors import PermissionDenied, Unauthenticated
from patchwire.service._forwarding import (
    IDENTITY_METADATA,
    ForwardedIdentities,
    HomeLink,
    decode_identity,
    encode_identity,
    home_socket,
    start_home_server,
)

SERVICE = "test.Relay"
ALICE = Identity("alice", frozenset({READ, WRITE}))


class _Context:
    def __init__(self, metadata: list[tuple[str, Any]]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, Any]]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


# -- the identity header -----------------------------------------------------------------------------------------


def test_an_identity_survives_the_header() -> None:
    assert decode_identity(encode_identity(ALICE)) == ALICE
    assert decode_identity(encode_identity(ANONYMOUS)) == ANONYMOUS
    assert decode_identity(encode_identity(ALICE).decode()) == ALICE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"name": "alice"}',
        b'{"name": "", "roles": ["read"]}',
        b'{"name": "alice", "roles": ["root"]}',
        b'{"name": 7, "roles": []}',
        b'{"name": "alice", "roles": "read"}',
        b'{"name": "' + b"a" * 5000 + b'", "roles": []}',
    ],
)
def test_anything_else_in_the_header_is_unauthenticated(data: bytes) -> None:
    with pytest.raises(Unauthenticated, match=IDENTITY_METADATA):
        decode_identity(data)


def test_the_home_gate_takes_the_forwarded_identity_and_checks_its_role() -> None:
    gate = ForwardedIdentities()
    header = (IDENTITY_METADATA, encode_identity(ALICE))
    assert gate.authorize(_Context([("x-request-id", "r1"), header]), "/m", WRITE) == ALICE
    assert gate.authorize(_Context([header]), "/m", None) == ALICE
    with pytest.raises(PermissionDenied, match="'alice' lacks the 'admin' role that /m needs"):
        gate.authorize(_Context([header]), "/m", "admin")
    with pytest.raises(Unauthenticated, match="carries the caller's identity"):
        gate.authorize(_Context([("authorization", "Bearer whatever")]), "/m", None)


def test_the_public_gate_never_reads_the_header() -> None:
    """A client sending the header on the public port gains nothing: the authenticator reads only its credentials."""
    token = "a-token-of-reader-0123456789"
    reader = Identity("reader", frozenset({READ}))
    auth = Authenticator(tokens=((token_digest(token), reader),))
    forged = (IDENTITY_METADATA, encode_identity(Identity("root", frozenset({"admin"}))))
    with pytest.raises(Unauthenticated, match="credentials required"):
        auth.authorize(_Context([forged]), "/m", None)
    with pytest.raises(PermissionDenied, match="'reader' lacks the 'write' role"):
        auth.authorize(_Context([forged, ("authorization", f"Bearer {token}")]), "/m", WRITE)


def test_relayed_metadata_drops_credentials_and_forged_identities() -> None:
    # in a context of its own: the identity set here must not outlive the test
    contextvars.copy_context().run(_check_relayed_metadata)


def _check_relayed_metadata() -> None:
    serving_as(ALICE)
    context = _Context(
        [
            ("authorization", "Bearer secret"),
            (IDENTITY_METADATA, encode_identity(Identity("root", frozenset({"admin"})))),
            ("user-agent", "grpc-python"),
            ("grpc-accept-encoding", "gzip"),
            ("x-request-id", "abc"),
            ("trace-bin", b"\x00\x01"),
        ]
    )
    relayed = _forwarding._relayed_metadata(context)
    assert relayed == [("x-request-id", "abc"), ("trace-bin", b"\x00\x01"), (IDENTITY_METADATA, encode_identity(ALICE))]


def test_the_home_socket_lives_in_the_run_folder(tmp_path: Path) -> None:
    assert home_socket(tmp_path) == tmp_path / "home.sock"


# -- the relay, between real servers -----------------------------------------------------------------------------


class _Home:
    """What the home's handlers saw."""

    def __init__(self) -> None:
        self.identities: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.cancelled = asyncio.Event()
        self.deadlines: list[float | None] = []

    def _seen(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        self.identities.append(decode_identity(metadata[IDENTITY_METADATA]).name)
        self.deadlines.append(context.time_remaining())

    def handler(self) -> grpc.GenericRpcHandler:
        async def echo(request: bytes, context: Any) -> bytes:
            self._seen(context)
            await context.send_initial_metadata((("home-initial", "yes"),))
            context.set_trailing_metadata((("home-trailing", "done"),))
            return b"echo:" + request

        async def fail(request: bytes, context: Any) -> bytes:
            self._seen(context)
            await context.abort(grpc.StatusCode.NOT_FOUND, "job_id: unknown job 'x'", (("why", "gone"),))
            raise AssertionError("abort returns no more")

        async def wait(request: bytes, context: Any) -> bytes:
            self._seen(context)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return b""

        async def repeat(request: bytes, context: Any) -> AsyncIterator[bytes]:
            self._seen(context)
            for k in range(int(request)):
                yield str(k).encode()
            context.set_trailing_metadata((("count", request.decode()),))

        async def join(requests: AsyncIterator[bytes], context: Any) -> bytes:
            self._seen(context)
            return b"+".join([r async for r in requests])

        async def each(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            self._seen(context)
            async for request in requests:
                if request == b"stop":
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to stop")
                yield request.upper()

        kw: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(echo, **kw),
                "Fail": grpc.unary_unary_rpc_method_handler(fail, **kw),
                "Wait": grpc.unary_unary_rpc_method_handler(wait, **kw),
                "Repeat": grpc.unary_stream_rpc_method_handler(repeat, **kw),
                "Join": grpc.stream_unary_rpc_method_handler(join, **kw),
                "Each": grpc.stream_stream_rpc_method_handler(each, **kw),
            },
        )


SHAPES = {"Echo": (False, False), "Fail": (False, False), "Wait": (False, False), "Repeat": (False, True)}
SHAPES |= {"Join": (True, False), "Each": (True, True)}


def _front_handler(link: HomeLink, auth: Authenticator | None) -> grpc.GenericRpcHandler:
    handlers = {}
    for name, shape in SHAPES.items():
        path = f"/{SERVICE}/{name}"
        handlers[name] = HANDLER_OF_SHAPE[shape](guarded(link.forwarder(path, *shape), path, auth, None))
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


TOKEN = "the-token-of-alice-0123456789"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, _Home]]:
    """A client channel to a front server whose calls are forwarded to a home on a Unix socket in ``tmp_path``;
    callers are authenticated on the front by a bearer token (alice)."""
    home = _Home()
    home_server = await start_home_server(tmp_path, [home.handler()], [])
    link = HomeLink(tmp_path)
    front = grpc.aio.server()
    front.add_generic_rpc_handlers((_front_handler(link, Authenticator(tokens=((token_digest(TOKEN), ALICE),))),))
    port = front.add_insecure_port("127.0.0.1:0")
    await front.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, home
    finally:
        await channel.close()
        await front.stop(0)
        await link.close()
        await home_server.stop(0)


def _call(channel: grpc.aio.Channel, name: str) -> Any:
    client_streaming, server_streaming = SHAPES[name]
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    return kind(f"/{SERVICE}/{name}")


AUTH = (("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-1"))


async def test_a_unary_call_comes_back_with_the_homes_bytes_and_metadata(
    relay: tuple[grpc.aio.Channel, _Home],
) -> None:
    channel, home = relay
    call = _call(channel, "Echo")(b"\x00payload\xff", metadata=AUTH, timeout=20)
    assert await call == b"echo:\x00payload\xff"
    assert ("home-initial", "yes") in tuple(await call.initial_metadata())
    assert ("home-trailing", "done") in tuple(await call.trailing_metadata())
    assert home.identities == ["alice"]
    seen = home.metadata[0]
    assert seen["x-request-id"] == "req-1" and "authorization" not in seen
    deadline = home.deadlines[0]
    assert deadline is not None and 0 < deadline <= 20  # the caller's deadline travelled on


async def test_a_forged_identity_on_the_front_is_replaced_by_the_authenticated_one(
    relay: tuple[grpc.aio.Channel, _Home],
) -> None:
    channel, home = relay
    forged = (IDENTITY_METADATA, encode_identity(Identity("root", frozenset({"admin"}))))
    assert await _call(channel, "Echo")(b"x", metadata=(*AUTH, forged), timeout=20) == b"echo:x"
    assert home.identities == ["alice"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(channel, "Echo")(b"x", metadata=(forged,), timeout=20)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert home.identities == ["alice"], "an unauthenticated call never reaches the home"


async def test_the_homes_status_details_and_trailing_metadata_reach_the_caller(
    relay: tuple[grpc.aio.Channel, _Home],
) -> None:
    channel, _ = relay
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _call(channel, "Fail")(b"x", metadata=AUTH, timeout=20)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "job_id: unknown job 'x'"
    assert ("why", "gone") in tuple(failed.value.trailing_metadata() or ())


async def test_a_server_stream_is_relayed_message_by_message(relay: tuple[grpc.aio.Channel, _Home]) -> None:
    channel, _ = relay
    call = _call(channel, "Repeat")(b"5", metadata=AUTH, timeout=20)
    assert [m async for m in call] == [b"0", b"1", b"2", b"3", b"4"]
    assert ("count", "5") in tuple(await call.trailing_metadata())


async def test_a_client_stream_is_relayed(relay: tuple[grpc.aio.Channel, _Home]) -> None:
    channel, _ = relay

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"a", b"b", b"c"):
            yield part

    assert await _call(channel, "Join")(parts(), metadata=AUTH, timeout=20) == b"a+b+c"


async def test_a_bidirectional_stream_answers_each_request_before_the_next_is_sent(
    relay: tuple[grpc.aio.Channel, _Home],
) -> None:
    """Like PostPredictions: the caller waits for each acknowledgement before it sends more; an error mid-stream
    ends the caller's stream with the home's code."""
    channel, _ = relay
    call = _call(channel, "Each")(metadata=AUTH, timeout=20)
    for word in (b"one", b"two"):
        await call.write(word)
        assert await call.read() == word.upper()
    await call.write(b"stop")
    with pytest.raises(grpc.aio.AioRpcError) as stopped:
        await call.read()
    assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stopped.value.details() == "told to stop"


async def test_a_cancelled_call_cancels_the_forwarded_one(relay: tuple[grpc.aio.Channel, _Home]) -> None:
    channel, home = relay
    call = _call(channel, "Wait")(b"", metadata=AUTH, timeout=20)
    while not home.identities:  # the home has the call
        await asyncio.sleep(0.01)
    call.cancel()
    await asyncio.wait_for(home.cancelled.wait(), 20)


async def test_a_deadline_that_passes_ends_both_calls(relay: tuple[grpc.aio.Channel, _Home]) -> None:
    channel, home = relay
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await _call(channel, "Wait")(b"", metadata=AUTH, timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(home.cancelled.wait(), 20)
