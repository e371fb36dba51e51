"""The allocator thresholds that patchwire sets: in the server, and once in every client process."""

from __future__ import annotations

import os
import platform

import pytest

import patchwire.client as pw
from patchwire.service import PatchwireServer
from patchwire.v1 import _malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_mallopt_is_applied_on_glibc() -> None:
    assert _malloc.tune_malloc() is True
    assert _malloc.tune_malloc(arena_max=2) is True


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
