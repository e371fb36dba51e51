"""A request's codec checked against the codecs a server offers: none always passes, an offered one passes, anything
else is INVALID_ARGUMENT naming what the server offers (or that it offers none, or which codecs it knows)."""

from __future__ import annotations

import pytest

from patchwire.service._codecs import OfferedCodecs
from patchwire.service._errors import InvalidArgument
from patchwire.wire.compression import NONE, Compression

LZ4 = Compression.COMPRESSION_LZ4
SHUFFLE_LZ4 = Compression.COMPRESSION_SHUFFLE_LZ4
SHUFFLE_ZSTD = Compression.COMPRESSION_SHUFFLE_ZSTD


def test_none_and_the_offered_codecs_pass() -> None:
    offered = OfferedCodecs(("shuffle-lz4", "lz4"))
    assert offered.codecs == (SHUFFLE_LZ4, LZ4)
    assert [offered.check(c, "compression") for c in (NONE, SHUFFLE_LZ4, LZ4)] == [NONE, SHUFFLE_LZ4, LZ4]
    assert OfferedCodecs().codecs == (LZ4, SHUFFLE_LZ4, SHUFFLE_ZSTD)  # every codec this build has, by default


@pytest.mark.parametrize(
    ("names", "value", "message"),
    [
        (("lz4",), SHUFFLE_ZSTD, "integer_compression: this server does not offer shuffle-zstd (it offers lz4)"),
        ((), SHUFFLE_LZ4, "integer_compression: this server does not offer shuffle-lz4 (it offers no compression)"),
        (("lz4",), 9, "integer_compression: unknown codec 9 (this server knows COMPRESSION_UNSPECIFIED, "),
        (("lz4",), -1, "integer_compression: unknown codec -1 (this server knows "),  # (proto3 enums are open)
        (("lz4",), 2**31 - 1, "integer_compression: unknown codec 2147483647 (this server knows "),
    ],
)
def test_anything_else_is_invalid_argument(names: tuple[str, ...], value: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        OfferedCodecs(names).check(value, "integer_compression")
    assert str(refused.value).startswith(message)


def test_a_name_this_build_does_not_know_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="unknown codec 'brotli'"):
        OfferedCodecs(("brotli",))
