"""The plumbing of the client's interceptors that add metadata to every call (a request id, a bearer token).

gRPC's call details are read-only, and an interceptor has four methods, one per call shape: :class:`MetadataInterceptor`
holds both, so an interceptor says only which metadata a call goes out with.
"""

from __future__ import annotations

import collections
from typing import Any

import grpc

__all__ = ["MetadataInterceptor"]


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Sends every call (all four shapes) with the metadata :meth:`metadata` gives for it."""

    def metadata(self, details: Any) -> list[tuple[str, Any]] | None:
        """The whole metadata the call described by ``details`` goes out with; None leaves the call as it is."""
        raise NotImplementedError

    def _details(self, details: Any) -> Any:
        metadata = self.metadata(details)
        if metadata is None:
            return details
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(
    collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    """A call's details with other metadata (gRPC's own are read-only)."""
