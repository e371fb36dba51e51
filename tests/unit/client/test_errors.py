"""The client's exception tree: every gRPC status code maps to one patchwire error, which is also the built-in
exception a pymia user catches; malformed streams become ProtocolError; errors survive pickling."""

from __future__ import annotations

import pickle

import grpc
import pytest

import patchwire.client as pw
from patchwire.client._errors import from_grpc, translate_rpc_errors
from patchwire.wire.errors import FramingError, WireError

from _checks import FakeRpcError

EXPECTED: dict[grpc.StatusCode, tuple[type[pw.PatchwireError], tuple[type[BaseException], ...]]] = {
    grpc.StatusCode.OK: (pw.ServerError, ()),
    grpc.StatusCode.CANCELLED: (pw.ServerError, ()),
    grpc.StatusCode.UNKNOWN: (pw.ServerError, ()),
    grpc.StatusCode.INVALID_ARGUMENT: (pw.InvalidArgumentError, (ValueError,)),
    grpc.StatusCode.DEADLINE_EXCEEDED: (pw.DeadlineExceeded, (TimeoutError, ConnectionError)),
    grpc.StatusCode.NOT_FOUND: (pw.NotFoundError, (KeyError, LookupError)),
    grpc.StatusCode.ALREADY_EXISTS: (pw.ServerError, ()),
    grpc.StatusCode.PERMISSION_DENIED: (pw.PermissionDeniedError, (PermissionError,)),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (pw.ResourceExhaustedError, ()),
    grpc.StatusCode.FAILED_PRECONDITION: (pw.FailedPreconditionError, (ValueError,)),
    grpc.StatusCode.ABORTED: (pw.ServerError, ()),
    grpc.StatusCode.OUT_OF_RANGE: (pw.OutOfRangeError, (IndexError,)),
    grpc.StatusCode.UNIMPLEMENTED: (pw.ServerError, ()),
    grpc.StatusCode.INTERNAL: (pw.ServerError, ()),
    grpc.StatusCode.UNAVAILABLE: (pw.ServerUnavailable, (ConnectionError,)),
    grpc.StatusCode.DATA_LOSS: (pw.ServerError, ()),
    grpc.StatusCode.UNAUTHENTICATED: (pw.AuthenticationError, ()),
}


def test_every_status_code_is_mapped() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_status_code_maps_to_its_error(code: grpc.StatusCode) -> None:
    kind, builtins = EXPECTED[code]
    error = from_grpc(FakeRpcError(code), "reading something")
    assert type(error) is kind
    assert isinstance(error, pw.PatchwireError)
    for builtin in builtins:
        assert isinstance(error, builtin), builtin
    assert str(error).startswith("reading something: ")
    assert "the server's words" in str(error)
    if isinstance(error, pw.RpcError):
        assert error.code == code and error.details == "the server's words"
    else:
        assert isinstance(error, pw.ConnectionFailed)


def test_the_tree() -> None:
    assert issubclass(pw.FailedPreconditionError, pw.InvalidArgumentError)
    assert issubclass(pw.RetriesExhausted, pw.ConnectionFailed)
    assert issubclass(pw.ProtocolError, ValueError) and not issubclass(pw.ProtocolError, pw.RpcError)
    for kind in (pw.ServerUnavailable, pw.DeadlineExceeded, pw.RetriesExhausted):
        assert issubclass(kind, pw.ConnectionFailed) and issubclass(kind, ConnectionError)
    rpc = [e for e in vars(pw).values() if isinstance(e, type) and issubclass(e, pw.RpcError)]
    assert len(rpc) == 9


def test_messages_are_not_decorated_by_the_builtin_bases() -> None:
    """KeyError quotes its argument and OSError formats errno fields; patchwire's errors print their message."""
    assert str(from_grpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "unknown dataset 'x'"), "opening")) == (
        "opening: unknown dataset 'x'"
    )
    assert str(from_grpc(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no"), "posting")) == "posting: no"
    assert str(pw.ConnectionFailed("a reason")) == "a reason"


def test_translation_raises_from_the_grpc_error() -> None:
    cause = FakeRpcError(grpc.StatusCode.OUT_OF_RANGE, "index 9 of 3")
    with (
        pytest.raises(pw.OutOfRangeError, match="reading sample 9: index 9 of 3") as info,
        translate_rpc_errors("reading sample 9"),
    ):
        raise cause
    assert info.value.__cause__ is cause


@pytest.mark.parametrize("error", [FramingError("chunk: a tensor chunk arrived before any batch"), WireError("x")])
def test_a_malformed_stream_is_a_protocol_error(error: WireError) -> None:
    malformed = "streaming dataset 'd': the server sent a malformed stream"
    with pytest.raises(pw.ProtocolError, match=malformed) as info, translate_rpc_errors("streaming dataset 'd'"):
        raise error
    assert info.value.__cause__ is error


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), translate_rpc_errors("anything"):
        raise KeyError("not a gRPC error")


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT])
def test_rpc_errors_survive_pickling(code: grpc.StatusCode) -> None:
    """DataLoader workers and multiprocessing hand errors to the main process pickled."""
    error = from_grpc(FakeRpcError(code), "opening")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.code == code


def test_retries_exhausted_survives_pickling() -> None:
    error = pw.RetriesExhausted("posting", "127.0.0.1:1", 60.0, 12, "UNAVAILABLE")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is pw.RetriesExhausted and str(copy) == str(error) and copy.attempts == 12
