"""The codecs a server offers (``ServerConfig.compressions``) and a request's codec checked against them: every request
field that asks for compression (GetSamples, StreamBatches, FetchSubject) is checked here, with one message."""

from __future__ import annotations

from collections.abc import Sequence

from patchwire.service._errors import InvalidArgument
from patchwire.wire import compression

__all__ = ["OfferedCodecs"]


class OfferedCodecs:
    """``names``: the codecs offered, by name (ValueError for a name this build does not know)."""

    def __init__(self, names: Sequence[str] = compression.SUPPORTED) -> None:
        self.codecs = tuple(compression.codec_from_name(name) for name in names)

    def check(self, value: int, field: str) -> int:
        """``value`` (a request's ``Compression``), or InvalidArgument naming the offered codecs for one this server
        does not offer or know."""
        if value == compression.NONE:
            return value
        if value not in compression.Compression.values():
            known = ", ".join(compression.Compression.keys())
            raise InvalidArgument(f"{field}: unknown codec {value} (this server knows {known})")
        if value not in self.codecs:
            offered = ", ".join(compression.codec_name(c) for c in self.codecs)
            raise InvalidArgument(
                f"{field}: this server does not offer {compression.codec_name(value)} "
                f"({f'it offers {offered}' if offered else 'it offers no compression'})"
            )
        return value
