"""The server's exception tree and its one translation to gRPC status codes.

::

    ServiceError                 INTERNAL (unexpected; logged with traceback)
     ├── InvalidArgument         INVALID_ARGUMENT  (bad spec, parameter or payload)
     ├── NotFound                NOT_FOUND         (unknown dataset, subject, category, entry)
     ├── OutOfRange              OUT_OF_RANGE      (sample or subject index past the end)
     ├── FailedPrecondition      FAILED_PRECONDITION (the dataset cannot serve the request as it is)
     ├── Unauthenticated         UNAUTHENTICATED   (no credentials, or credentials nobody is configured with)
     ├── PermissionDenied        PERMISSION_DENIED (the caller's roles or ownership do not allow it)
     ├── ResourceExhausted       RESOURCE_EXHAUSTED (a configured limit: streams, jobs, bytes, disk)
     └── Unavailable             UNAVAILABLE       (a dataset that cannot be served right now)

Handlers raise these; :func:`translate_errors` turns them into ``context.abort`` calls, so that the server keeps
serving and a client receives a status code plus a message that names the offending field. A call the client has
ended (cancelled, disconnected, deadline passed) is normal: one DEBUG or INFO line, never an ERROR traceback.
Anything a client sent that appears in a message goes through :func:`bounded`, and messages are cut at
``MAX_MESSAGE_CHARS``: a request never makes a status or a log line larger than a few hundred bytes.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NoReturn, TypeVar

import grpc

from patchwire.wire.errors import EncodingError

__all__ = [
    "MAX_ECHO_CHARS",
    "MAX_MESSAGE_CHARS",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "bounded",
    "bounded_list",
    "refuse",
    "translate_errors",
]

MAX_MESSAGE_CHARS = 1000
"""Longest status message (and log line about a request) the server writes."""
MAX_ECHO_CHARS = 80
"""Longest piece of a client's request repeated in a message."""


def bounded(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with a note of the full length: how a client's own text is
    repeated back to it or into a log."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


MAX_LISTED = 5
"""Most items of a client's list (unknown subjects, entries, ...) repeated in a message."""


def bounded_list(values: Iterable[object], limit: int = MAX_LISTED, quote: bool = True) -> str:
    """The first ``limit`` values, each through :func:`bounded`, then how many more there are: how a list a client
    sent is repeated back to it or into a log (``'a', 'b' and 998 more``). ``quote=False`` for the server's own
    names (entries, subjects), listed as they are (``T1, T2``), also at most ``limit`` of them."""
    items = list(values)
    shown = ", ".join(bounded(v) if quote else str(v)[:MAX_ECHO_CHARS] for v in items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else f"{message[:MAX_MESSAGE_CHARS]}... (cut)"


_log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the server reports to a client, with the status code it is reported as."""

    code = grpc.StatusCode.INTERNAL

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class InvalidArgument(ServiceError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """A bad spec, parameter or payload."""


class NotFound(ServiceError, code=grpc.StatusCode.NOT_FOUND):
    """An unknown dataset, subject, category or entry."""


class OutOfRange(ServiceError, code=grpc.StatusCode.OUT_OF_RANGE):
    """A sample or subject index past the end."""


class FailedPrecondition(ServiceError, code=grpc.StatusCode.FAILED_PRECONDITION):
    """The dataset cannot serve the request as it is."""


class Unauthenticated(ServiceError, code=grpc.StatusCode.UNAUTHENTICATED):
    """No credentials, or credentials nobody is configured with."""


class PermissionDenied(ServiceError, code=grpc.StatusCode.PERMISSION_DENIED):
    """The caller's roles or ownership do not allow it."""


class ResourceExhausted(ServiceError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """A configured limit: streams, jobs, bytes, disk."""


class Unavailable(ServiceError, code=grpc.StatusCode.UNAVAILABLE):
    """A dataset that cannot be served right now."""


class Internal(ServiceError):
    """The server could not do what it should have (e.g. a disk write failed); nothing the client did wrong."""


F = TypeVar("F", bound=Callable[..., Any])


def _client_gone(context: grpc.aio.ServicerContext) -> bool:
    """Whether the client has already ended the call (cancelled it, disconnected, or let its deadline pass)."""
    try:
        return bool(context.cancelled() or context.done())
    except Exception:  # a context without these (a test double): assume the client still listens
        return False


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if _client_gone(context):  # nobody reads the status: one quiet line, never a traceback
        _log.info(
            "%s: ended by the client (cancelled, disconnected or timed out) while failing: %s",
            method,
            _cut(f"{type(exc).__name__}: {exc}"),
        )
        await context.abort(grpc.StatusCode.CANCELLED, "the client ended the call")
    if isinstance(exc, MemoryError):  # a request whose memory the server could not get: refused, not a crash
        exc = ResourceExhausted(f"{method}: the server has no memory for this request")
    elif isinstance(exc, EncodingError):  # samples a request's spec made that cannot travel (e.g. a list of objects)
        exc = InvalidArgument(str(exc))
    if isinstance(exc, ServiceError) and not isinstance(exc, Internal):
        message = _cut(str(exc))
        _log.warning("%s: %s: %s", method, exc.code.name, message)  # one bounded line: a client's doing, no traceback
        await context.abort(exc.code, message)
    _log.exception("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, _cut(f"internal error in {method}: {type(exc).__name__}: {exc}"))


async def refuse(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    """Ends the call with the status of ``exc``, logged like every refusal (for code outside a translated handler,
    e.g. request parsing)."""
    await _abort(context, exc, method)
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


class _PeerGone(logging.Filter):
    """gRPC logs at ERROR when a streaming handler's next message cannot be sent because the client is gone
    (cancelled, disconnected, timed out): a normal event, said here at DEBUG in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and message.startswith("ExecuteBatchError raised in core by servicer"):
            _log.debug("%s: stream ended by the client (%s)", message.rsplit("[", 1)[-1].rstrip("]"), message)
            return False
        return True


def quiet_client_endings() -> None:
    """Installs the filter on gRPC's logger (idempotent)."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _PeerGone) for f in logger.filters):
        logger.addFilter(_PeerGone())


def translate_errors(handler: F) -> F:
    """Maps ServiceError (and anything unexpected) raised by a unary or server-streaming handler to a status."""
    name = handler.__name__
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:  # the client cancelled, disconnected or timed out: normal, not an error
                _log.debug("%s: stream ended by the client", name)
                raise
            except Exception as exc:
                await _abort(context, exc, name)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            _log.debug("%s: call ended by the client", name)
            raise
        except Exception as exc:
            await _abort(context, exc, name)

    return unary_wrapper  # type: ignore[return-value]
