"""Requests arrive as wire bytes and are parsed here, so that bytes that do not parse get a status of their own.

gRPC's generated handlers parse a request before the handler runs; when parsing fails, grpc.aio answers UNKNOWN
and logs a traceback for every such request. :func:`parsed` wraps a unary or server-streaming handler so that it
receives the raw bytes and parses them itself: bytes that are not the method's request message (including
messages nested deeper than protobuf's recursion limit) get INVALID_ARGUMENT naming the message type, logged as
one line without a traceback like every other refusal (:mod:`patchwire.service._errors`). Client-streaming
methods read their stream as bytes already and parse each message themselves.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message

from patchwire.service._errors import InvalidArgument, refuse

__all__ = ["parse_request", "parsed"]


def parse_request(message_class: type[Message], data: bytes) -> Any:
    """``message_class`` parsed from ``data``; InvalidArgument naming the type when the bytes are not one."""
    try:
        return message_class.FromString(data)
    except (DecodeError, RecursionError):  # (protobuf's recursion limit is a DecodeError; pure Python may recurse)
        raise InvalidArgument(
            f"request: {len(data)} bytes that are not a {message_class.DESCRIPTOR.full_name} message"
        ) from None


def parsed(behavior: Callable[..., Any], method: descriptor.MethodDescriptor) -> Callable[..., Any]:
    """``behavior`` (a bound unary or server-streaming handler) taking the request's wire bytes instead."""
    message_class = message_factory.GetMessageClass(method.input_type)
    name = method.name
    if inspect.isasyncgenfunction(behavior):

        @functools.wraps(behavior)
        async def stream(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                request = parse_request(message_class, data)
            except InvalidArgument as exc:
                await refuse(context, exc, name)
            async for item in behavior(request, context):
                yield item

        return stream

    @functools.wraps(behavior)
    async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse_request(message_class, data)
        except InvalidArgument as exc:
            await refuse(context, exc, name)
        return await behavior(request, context)

    return unary
