"""The names both ends give the API's enums: what a user writes (``overlap="average"``) and what travels."""

from __future__ import annotations

from patchwire.v1 import assembly_service_pb2 as apb

__all__ = ["OVERLAP_MODES", "overlap_mode_name"]

#: Overlap modes of an assembly job by name: 'overwrite' (pymia's: the last write wins), 'average' and 'gaussian'
#: (weighted averages of overlapping predictions).
OVERLAP_MODES: dict[str, apb.OverlapMode.ValueType] = {
    "overwrite": apb.OVERLAP_MODE_OVERWRITE,
    "average": apb.OVERLAP_MODE_AVERAGE,
    "gaussian": apb.OVERLAP_MODE_GAUSSIAN,
}
_BY_VALUE = {v: k for k, v in OVERLAP_MODES.items()}


def overlap_mode_name(value: int) -> str:
    """The name of a wire overlap mode ('unspecified' for the unset value); ValueError for an unknown one."""
    if value == apb.OVERLAP_MODE_UNSPECIFIED:
        return "unspecified"
    try:
        return _BY_VALUE[apb.OverlapMode.ValueType(value)]
    except KeyError:
        raise ValueError(f"unknown overlap mode {value}") from None
