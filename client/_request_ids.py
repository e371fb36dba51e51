"""Every call a client makes carries a fresh request id (``x-request-id`` metadata), which the server puts on every log
line of the call and echoes in its trailing metadata: one id to find a client's call in the server's logs.

The id is logged at DEBUG by the ``patchwire.client`` logger when the call starts, and an error the server answered
with carries it (:attr:`patchwire.client.RpcError.request_id`, read from the echo by :func:`request_id_of`). A call
whose metadata already holds an id keeps it (a caller that chose its own).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from patchwire.client._interceptors import MetadataInterceptor

__all__ = ["REQUEST_ID_KEY", "RequestIds", "new_request_id", "request_id_of"]

_log = logging.getLogger("patchwire.client")

REQUEST_ID_KEY = "x-request-id"
"""The metadata key of a call's request id (the server's ``patchwire.service._calls`` reads the same key)."""


def new_request_id() -> str:
    """A fresh request id: 16 random hex digits."""
    return secrets.token_hex(8)


def request_id_of(error: Any) -> str | None:
    """The request id a failed call's trailing metadata echoes (None where the server did not answer)."""
    try:
        trailing = error.trailing_metadata()
    except Exception:  # not a call, or one that never reached a server
        return None
    for key, value in trailing or ():
        if key == REQUEST_ID_KEY:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return None


class RequestIds(MetadataInterceptor):
    """Adds ``x-request-id: <fresh id>`` to every call's metadata (unless it has one) and logs it at DEBUG."""

    def metadata(self, details: Any) -> list[tuple[str, Any]] | None:
        metadata = list(details.metadata or ())
        if any(key == REQUEST_ID_KEY for key, _ in metadata):
            return None
        request_id = new_request_id()
        _log.debug("%s: request id %s", details.method, request_id)
        metadata.append((REQUEST_ID_KEY, request_id))
        return metadata
