"""The allocator thresholds a client process sets: once, on its first channel, unless told not to."""

from __future__ import annotations

import os

import pytest

import patchwire.client as pw
from patchwire.service import PatchwireServer
from patchwire.wire import malloc as _malloc


def test_a_client_process_is_tuned_once_on_its_first_channel(
    server: PatchwireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_malloc, "tune_malloc", lambda *a, **k: calls.append(os.getpid()) or True)
    monkeypatch.setattr(_malloc, "_client_pid", -1)  # as in a process that has not connected yet
    monkeypatch.delenv(_malloc.ENV_TUNE, raising=False)
    with pw.connect(server.address) as first, pw.connect(server.address) as second:
        assert first.describe("tiny").name == second.describe("tiny").name == "tiny"
    assert calls == [os.getpid()]


def test_a_client_process_can_keep_its_allocator_as_it_is(
    server: PatchwireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_malloc, "tune_malloc", lambda *a, **k: calls.append(os.getpid()) or True)
    monkeypatch.setattr(_malloc, "_client_pid", -1)
    monkeypatch.setenv(_malloc.ENV_TUNE, "0")
    with pw.connect(server.address) as client:
        assert client.describe("tiny").name == "tiny"
    assert calls == []
