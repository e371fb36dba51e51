"""Checks the tests share: a client error's class, status and message; a raw call's status; waiting for a condition
without sleeping longer than needed; client threads whose errors fail the test; and a stand-in for the errors grpc
raises."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest

import patchwire.client as pw

T = TypeVar("T")


@contextlib.contextmanager
def expect(
    error: type[pw.RpcError], code: grpc.StatusCode, *fragments: str, in_details: bool = False
) -> Iterator[None]:
    """The block raises ``error`` with status ``code`` and a message holding every fragment, as a patchwire error
    (never a raw gRPC error); ``in_details``: the fragments are in the server's own words (``details``) too."""
    with pytest.raises(error) as info:
        yield
    exc = info.value
    assert not isinstance(exc, grpc.RpcError), f"a raw gRPC error reached the user: {exc!r}"
    assert isinstance(exc, pw.PatchwireError)
    assert exc.code == code, exc
    for fragment in fragments:
        assert fragment in str(exc), f"{fragment!r} not in {str(exc)!r}"
        if in_details:
            assert fragment in exc.details, f"{fragment!r} not in the server's details {exc.details!r}"


@contextlib.contextmanager
def expect_raw(code: grpc.StatusCode, *fragments: str) -> Iterator[None]:
    """The block (a raw stub call) fails with ``code`` and details holding every fragment."""
    with pytest.raises(grpc.RpcError) as info:
        yield
    exc: Any = info.value
    assert exc.code() == code, exc
    for fragment in fragments:
        assert fragment in exc.details(), f"{fragment!r} not in {exc.details()!r}"


@contextlib.contextmanager
def region_of_another_identity(monkeypatch: pytest.MonkeyPatch, servicer_module: Any) -> Iterator[None]:
    """The block (a raw stub call naming a region) is served, by the service of ``servicer_module``, as another
    identity than the region's owner's (a server without authentication serves everyone as ANONYMOUS), and fails
    with PERMISSION_DENIED."""
    from patchwire.service._auth import ANONYMOUS, Identity

    with monkeypatch.context() as patched:
        patched.setattr(servicer_module, "current_identity", lambda: Identity("mallory", ANONYMOUS.roles))
        with expect_raw(grpc.StatusCode.PERMISSION_DENIED, "shared_memory.region: the region belongs to"):
            yield


def eventually(read: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 10.0) -> T:
    """``read()`` until ``ok`` holds for it (state that the server settles on its own threads), or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ok(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r} after {timeout_s} s"
        time.sleep(0.01)


class Threads:
    """Threads (a test's clients) whose exceptions are collected, joined with a bound: :meth:`join` fails the test
    when one raised or is still running."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append(exc)
                raise  # (its traceback printed too)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for each thread; none may still run, none may have raised."""
        for thread in self._threads:
            thread.join(timeout=timeout_s)
            assert not thread.is_alive(), "a client thread did not finish"
        assert self.errors == []


class FakeRpcError(grpc.RpcError):
    """What grpc raises: an RpcError that is also a Call, with a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str = "the server's words") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def check_seed_runs_equal(
    remote: tuple[list[Any], dict[int, Any]],
    local: tuple[list[Any], dict[int, Any]],
    batch_shape: tuple[int, ...],
    prediction_shape: tuple[int, ...],
) -> None:
    """A seed-example run against a server equals pymia's local run: 30 batches of ``batch_shape`` (images, sample
    indices, predictions), and per subject the assembled prediction of ``prediction_shape`` (float32 here, pymia's
    float64: equal after casting), labels and image properties from direct extraction."""
    import numpy as np

    (remote_batches, remote_assembled), (local_batches, local_assembled) = remote, local
    assert len(remote_batches) == len(local_batches) == 30
    for (rx, ri, rp), (lx, li, lp) in zip(remote_batches, local_batches, strict=True):
        assert rx.dtype == lx.dtype == np.float32 and rx.shape == lx.shape == batch_shape
        assert np.array_equal(rx, lx) and np.array_equal(ri, li) and np.array_equal(rp, lp)
    assert sorted(remote_assembled) == sorted(local_assembled) == [0, 1, 2]
    for s, (pred, labels, props) in remote_assembled.items():
        lpred, llabels, lprops = local_assembled[s]
        assert pred.dtype == np.float32 and lpred.dtype == np.float64
        assert pred.shape == lpred.shape == prediction_shape and np.array_equal(pred.astype(np.float64), lpred)
        assert labels.dtype == llabels.dtype and np.array_equal(labels, llabels)
        assert (props.size, props.origin, props.spacing, props.direction) == (
            lprops.size,
            lprops.origin,
            lprops.spacing,
            lprops.direction,
        )
