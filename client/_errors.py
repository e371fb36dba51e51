"""The client's exception tree; gRPC errors and malformed streams are translated here and nowhere else.

::

    PatchwireError
     ├── ConnectionFailed (ConnectionError)        the call did not get through to a working server
     │    ├── ServerUnavailable                        UNAVAILABLE: nothing listens, the connection broke, TLS failed
     │    ├── DeadlineExceeded (TimeoutError)          DEADLINE_EXCEEDED: no answer within the call's deadline,
     │    │                                            or keepalive pings unanswered (a wedged server)
     │    └── RetriesExhausted                         ... and stayed so for a whole retry budget (.address, .elapsed_s)
     ├── ProtocolError (ValueError)                a server's messages break the wire format (a corrupt stream)
     └── RpcError                                  the server answered with an error status (.code, .details,
          │                                            .request_id)
          ├── InvalidArgumentError (ValueError)        INVALID_ARGUMENT: a spec, parameter or payload was rejected
          │    └── FailedPreconditionError              FAILED_PRECONDITION: valid, but not in the server's state
          ├── NotFoundError (KeyError)                 NOT_FOUND: an unknown dataset, subject, entry or job
          ├── OutOfRangeError (IndexError)             OUT_OF_RANGE (so ``for s in datasource`` ends as in pymia)
          ├── ResourceExhaustedError                   RESOURCE_EXHAUSTED: a server limit (the message names its flag)
          ├── AuthenticationError                      UNAUTHENTICATED: no, wrong or unknown token or certificate
          ├── PermissionDeniedError (PermissionError)  PERMISSION_DENIED: a role the identity lacks; another's job
          └── ServerError                              INTERNAL, CANCELLED and anything else

Each class also derives from the built-in exception a pymia user already catches where one fits (pymia's own
checks raise ``ValueError``, ``KeyError`` and ``IndexError``). :func:`translate_rpc_errors` is the one place that
turns ``grpc.RpcError`` (:func:`from_grpc`) and the wire layer's format errors into these: every expected failure
reaches the user as one of them, with the server's message, never as a raw gRPC error. Retrying (which failures,
how long) is :mod:`patchwire.client._retry`'s business: it retries ``ConnectionFailed`` calls.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import grpc

from patchwire.client._request_ids import request_id_of
from patchwire.wire.errors import WireError

__all__ = [
    "AuthenticationError",
    "ConnectionFailed",
    "DeadlineExceeded",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PatchwireError",
    "PermissionDeniedError",
    "ProtocolError",
    "ResourceExhaustedError",
    "RetriesExhausted",
    "RpcError",
    "ServerError",
    "ServerUnavailable",
    "from_grpc",
    "translate_rpc_errors",
]


class PatchwireError(Exception):
    """Base of every error patchwire's client raises."""


class ConnectionFailed(PatchwireError, ConnectionError):
    """The call did not get through to a working server: it cannot be reached, or did not answer in time."""

    def __str__(self) -> str:  # (OSError's own str would show errno fields for two arguments)
        return str(self.args[0]) if self.args else ""


class ServerUnavailable(ConnectionFailed):
    """No server answers at the address (nothing listens, the connection was reset, the TLS handshake failed), or
    it cancelled the call while stopping (UNAVAILABLE)."""


class DeadlineExceeded(ConnectionFailed, TimeoutError):
    """The server did not answer within the call's deadline (DEADLINE_EXCEEDED)."""


class RetriesExhausted(ConnectionFailed):
    """A call failed with retriable errors (the server unreachable or restarting) until its retry budget ran out."""

    def __init__(self, what: str, address: str, elapsed_s: float, attempts: int, reason: str) -> None:
        super().__init__(
            f"{what}: gave up after {elapsed_s:.1f} s and {attempts} failed attempts: the patchwire server at "
            f"{address} stayed unavailable (last: {reason})"
        )
        self.address = address
        self.elapsed_s = elapsed_s
        self.attempts = attempts
        self._parts = (what, address, elapsed_s, attempts, reason)

    def __reduce__(self) -> tuple[type[RetriesExhausted], tuple[str, str, float, int, str]]:
        return type(self), self._parts


class ProtocolError(PatchwireError, ValueError):
    """The server's messages break the wire format: chunks without a batch, a stream cut in the middle of a batch,
    payloads that do not match their tensors. A server of another version, or a corrupted connection."""


class RpcError(PatchwireError):
    """The server answered a call with an error status."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details
        self.request_id = request_id
        """The call's request id as the server echoed it: what the server's log lines about the call carry."""

    def __reduce__(self) -> tuple[type[RpcError], tuple[str, grpc.StatusCode, str, str | None]]:
        return type(self), (str(self), self.code, self.details, self.request_id)


class InvalidArgumentError(RpcError, ValueError):
    """A spec, parameter or payload was rejected."""


class FailedPreconditionError(InvalidArgumentError):
    """The request is valid but the server's state does not allow it: a subject not ready yet, a job that was
    aborted or is completed, a dataset without what the request needs, shared memory turned off."""


class NotFoundError(RpcError, KeyError):
    """A dataset, subject, category, entry or assembly job does not exist."""

    def __str__(self) -> str:  # (KeyError's own str would quote the message)
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(RpcError, IndexError):
    """An index lies past the end."""


class ResourceExhaustedError(RpcError):
    """A limit of the server's was reached (concurrent calls, jobs, bytes, disk); the message names the flag that
    sets it. Retrying later may succeed."""


class AuthenticationError(RpcError):
    """The server does not know the caller: no credentials, or a token or certificate it is not configured with."""


class PermissionDeniedError(RpcError, PermissionError):
    """The caller's identity lacks the role a call needs, or the assembly job belongs to another identity."""

    def __str__(self) -> str:  # (OSError's own str would show errno fields)
        return str(self.args[0]) if self.args else ""


class ServerError(RpcError):
    """The server failed unexpectedly (INTERNAL), cancelled the call, or answered with a status patchwire does not
    expect."""


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


_WEDGED = re.compile(r"keepalive|ping timeout|timed out before receiving SETTINGS", re.IGNORECASE)
"""What gRPC says (with UNAVAILABLE) of a server that accepts connections but answers nothing, not even pings."""


def from_grpc(exc: grpc.RpcError, what: str) -> PatchwireError:
    """The patchwire error for a gRPC error of the call described by ``what``."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and _WEDGED.search(details):  # see _timeouts
        return DeadlineExceeded(f"{what}: the server stopped answering ({code.name}): {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailable(f"{what}: server unavailable ({code.name}): {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: no answer in time ({code.name}): {details}")
    return _BY_CODE.get(code, ServerError)(f"{what}: {details}", code, details, request_id_of(exc))


@contextlib.contextmanager
def translate_rpc_errors(what: str) -> Iterator[None]:
    """Turns a grpc.RpcError raised inside the block into the matching PatchwireError, and a wire format error (a
    malformed stream) into ProtocolError."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_grpc(exc, what) from exc
    except WireError as exc:
        raise ProtocolError(f"{what}: the server sent a malformed stream: {exc}") from exc
