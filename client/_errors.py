"""The client's exception tree; gRPC errors are translated here and nowhere else.

::

    PatchwireError
     ├── ConnectionFailed                     the server cannot be reached (UNAVAILABLE, deadline at connect)
     │    └── RetriesExhausted                     ... and stayed so for a whole retry budget (.address, .elapsed_s)
     └── RpcError                             the server answered with an error status (.code, .details)
          ├── InvalidArgumentError (ValueError)    INVALID_ARGUMENT, FAILED_PRECONDITION
          ├── NotFoundError (LookupError)          NOT_FOUND
          ├── OutOfRangeError (IndexError)         OUT_OF_RANGE (so ``for s in datasource`` ends as in pymia)
          ├── AuthenticationError                  UNAUTHENTICATED (no, wrong or unknown token or certificate)
          ├── PermissionDeniedError (PermissionError)  PERMISSION_DENIED (a role the identity lacks; another's job)
          └── ServerError                          INTERNAL and anything else

Every expected failure reaches the user as one of these, with the server's message, never as a raw gRPC error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

__all__ = [
    "AuthenticationError",
    "ConnectionFailed",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PatchwireError",
    "PermissionDeniedError",
    "RetriesExhausted",
    "RpcError",
    "ServerError",
    "translate_rpc_errors",
]


class PatchwireError(Exception):
    """Base of every error patchwire's client raises."""


class ConnectionFailed(PatchwireError):
    """The server could not be reached."""


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


class RpcError(PatchwireError):
    """The server answered a call with an error status."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class InvalidArgumentError(RpcError, ValueError):
    """A spec, parameter or payload was rejected."""


class NotFoundError(RpcError, LookupError):
    """A dataset, subject, category or entry does not exist."""


class OutOfRangeError(RpcError, IndexError):
    """An index lies past the end."""


class AuthenticationError(RpcError):
    """The server does not know the caller: no credentials, or a token or certificate it is not configured with."""


class PermissionDeniedError(RpcError, PermissionError):
    """The caller's identity lacks the role a call needs, or the assembly job belongs to another identity."""


class ServerError(RpcError):
    """The server failed unexpectedly."""


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_grpc(exc: grpc.RpcError, what: str) -> PatchwireError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ConnectionFailed(f"{what}: server unavailable ({code.name}): {details}")
    return _BY_CODE.get(code, ServerError)(f"{what}: {details}", code, details)


@contextlib.contextmanager
def translate_rpc_errors(what: str) -> Iterator[None]:
    """Turns a grpc.RpcError raised inside the block into the matching PatchwireError."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_grpc(exc, what) from exc
