"""A metadata interceptor sends each call, of all four shapes, with the metadata it chooses and every other detail
unchanged; one that chooses None leaves the call's details as they are."""

from __future__ import annotations

from typing import Any

import pytest

from patchwire.client._interceptors import MetadataInterceptor


class _Details:
    method = "/patchwire.v1.DatasetService/ListDatasets"
    timeout = 7.5
    metadata = (("x-a", "1"),)
    credentials = None
    wait_for_ready = True
    compression = None


class _Tagged(MetadataInterceptor):
    def metadata(self, details: Any) -> list[tuple[str, Any]] | None:
        return [*details.metadata, ("x-b", "2")]


class _Untouched(MetadataInterceptor):
    def metadata(self, details: Any) -> list[tuple[str, Any]] | None:
        return None


SHAPES = ["intercept_unary_unary", "intercept_unary_stream", "intercept_stream_unary", "intercept_stream_stream"]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_chosen_metadata_replaces_the_call_s_and_nothing_else_changes(shape: str) -> None:
    seen: list[tuple[Any, Any]] = []

    def continuation(details: Any, request: Any) -> str:
        seen.append((details, request))
        return "answer"

    assert getattr(_Tagged(), shape)(continuation, _Details, "r") == "answer"
    [(details, request)] = seen
    assert request == "r"
    assert list(details.metadata) == [("x-a", "1"), ("x-b", "2")]
    assert (details.method, details.timeout, details.credentials, details.wait_for_ready, details.compression) == (
        _Details.method,
        7.5,
        None,
        True,
        None,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_none_leaves_the_details_as_they_are(shape: str) -> None:
    seen: list[Any] = []
    getattr(_Untouched(), shape)(lambda details, request: seen.append(details), _Details, "r")
    assert seen == [_Details]
