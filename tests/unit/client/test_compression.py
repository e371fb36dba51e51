"""The client's compression option: the names it takes, which targets count as this host, and what "auto" picks."""

from __future__ import annotations

from typing import Any, cast

import pytest

from patchwire.client import _compression
from patchwire.wire import compression


def test_options() -> None:
    assert _compression.CHOICES == ("auto", "none", "lz4", "shuffle-lz4", "shuffle-zstd")
    assert _compression.check_option("shuffle-zstd") == "shuffle-zstd"
    with pytest.raises(ValueError, match=r"compression must be one of 'auto', 'none', 'lz4', .* got 'gzip'"):
        _compression.check_option("gzip")


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "127.8.9.10:1",
        "localhost:50051",
        "[::1]:50051",
        "0.0.0.0:50051",
        "unix:/tmp/patchwire.sock",
        "unix:///tmp/patchwire.sock",
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        "dns:///localhost:50051",
        "127.0.0.1:1,localhost:2",
        ["127.0.0.1:1", "[::1]:2"],
    ],
)
def test_targets_on_this_host(target: str | list[str]) -> None:
    assert _compression.is_local_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "192.0.2.7:50051",  # TEST-NET-1: never an address of this host
        "[2001:db8::1]:50051",  # the IPv6 documentation prefix
        "ipv4:127.0.0.1:1,192.0.2.7:2",  # one replica elsewhere is enough
        ["127.0.0.1:1", "192.0.2.8:2"],
    ],
)
def test_targets_elsewhere(target: str | list[str]) -> None:
    assert not _compression.is_local_target(target)


class _Offline:
    """A connection whose server cannot be asked anything (resolve must not ask for these options)."""

    address = "192.0.2.7:50051"

    @property
    def channel(self) -> object:
        raise AssertionError("the server was asked")


def test_explicit_options_ask_the_server_nothing() -> None:
    connection: Any = _Offline()
    assert _compression.resolve("none", connection) == compression.NONE
    assert _compression.resolve("shuffle-zstd", connection) == compression.Compression.COMPRESSION_SHUFFLE_ZSTD


def test_auto_on_this_host_asks_the_server_nothing() -> None:
    connection: Any = _Offline()
    connection.address = "127.0.0.1:50051"
    assert _compression.resolve("auto", connection) == compression.NONE


@pytest.mark.parametrize(
    ("offers", "picked"),
    [
        (("lz4", "shuffle-zstd", "shuffle-lz4"), "shuffle-lz4"),
        (("lz4", "shuffle-zstd"), "shuffle-zstd"),
        (("lz4",), "lz4"),
        ((), "none"),
    ],
)
def test_auto_elsewhere_picks_the_preferred_codec_offered(
    offers: tuple[str, ...], picked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = tuple(compression.codec_from_name(n) for n in offers)
    monkeypatch.setattr(_compression, "server_offers", lambda connection: codes)
    assert compression.codec_name(_compression.resolve("auto", cast(Any, _Offline()))) == picked
