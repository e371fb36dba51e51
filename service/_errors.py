"""The server's exception tree and its one translation to gRPC status codes.

::

    ServiceError                 INTERNAL (unexpected; logged with traceback)
     ├── InvalidArgument         INVALID_ARGUMENT  (bad spec, parameter or payload)
     ├── NotFound                NOT_FOUND         (unknown dataset, subject, category, entry)
     ├── OutOfRange              OUT_OF_RANGE      (sample or subject index past the end)
     └── FailedPrecondition      FAILED_PRECONDITION (the dataset cannot serve the request as it is)

Handlers raise these; :func:`translate_errors` turns them into ``context.abort`` calls, so that the server keeps
serving and a client receives a status code plus a message that names the offending field.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

__all__ = [
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "ServiceError",
    "translate_errors",
]

_log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the server reports to a client."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Internal(ServiceError):
    """The server could not do what it should have (e.g. a disk write failed); nothing the client did wrong."""

    code = grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, ServiceError):
        _log.info("%s: %s: %s", method, exc.code.name, exc)
        await context.abort(exc.code, str(exc))
    _log.exception("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


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
            except Exception as exc:
                await _abort(context, exc, name)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, name)

    return unary_wrapper  # type: ignore[return-value]
