"""The overlap-mode names both ends use, against the API's enum."""

from __future__ import annotations

import pytest

from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire.names import OVERLAP_MODES, overlap_mode_name


def test_every_mode_of_the_api_has_a_name_and_back() -> None:
    modes = [v for v in apb.OverlapMode.values() if v != apb.OVERLAP_MODE_UNSPECIFIED]
    assert sorted(OVERLAP_MODES.values()) == sorted(modes)
    for name, value in OVERLAP_MODES.items():
        assert overlap_mode_name(value) == name == apb.OverlapMode.Name(value).removeprefix("OVERLAP_MODE_").lower()
    assert overlap_mode_name(apb.OVERLAP_MODE_UNSPECIFIED) == "unspecified"
    with pytest.raises(ValueError, match="unknown overlap mode 99"):
        overlap_mode_name(99)
