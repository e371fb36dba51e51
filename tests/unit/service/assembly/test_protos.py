"""CreateJobRequests read into the store's arguments: what a request alone decides is checked in field order."""

from __future__ import annotations

import numpy as np
import pytest

from patchwire.service._errors import InvalidArgument
from patchwire.service.assembly import EntrySpec
from patchwire.service.assembly.protos import create_arguments
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2, tensor_pb2


def _entry(name: str = "seg", channels: int = 2, dtype: int = tensor_pb2.DATA_TYPE_FLOAT32) -> apb.OutputEntry:
    return apb.OutputEntry(name=name, channels=channels, dtype=dtype)


def _request(**kwargs: object) -> apb.CreateJobRequest:
    fields: dict[str, object] = {
        "spec": spec_pb2.DatasourceSpec(dataset="tiny"),
        "overlap_mode": apb.OVERLAP_MODE_GAUSSIAN,
        "entries": [_entry()],
        "job_id": "job-1",
        **kwargs,
    }
    return apb.CreateJobRequest(**fields)


def test_a_request_becomes_the_stores_arguments() -> None:
    job_id, spec, entries, mode = create_arguments(_request(), "replica-2")
    assert (job_id, spec.dataset, entries, mode) == (
        "job-1",
        "tiny",
        [EntrySpec("seg", 2, np.dtype(np.float32))],
        "gaussian",
    )
    generated, *_ = create_arguments(_request(job_id=""), "replica-2")
    home, dot, rest = generated.partition(".")
    assert (home, dot, len(rest)) == ("replica-2", ".", 12)  # a server-chosen id names this server as the home
    kept, *_ = create_arguments(_request(job_id="other-7.mine"), "replica-2")
    assert kept == "other-7.mine"  # a client-chosen id is kept as given


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"spec": None}, "spec: the datasource whose predictions to assemble is required"),
        ({"overlap_mode": 99}, "overlap_mode: choose OVERLAP_MODE_OVERWRITE, _AVERAGE or _GAUSSIAN, got 99"),
        ({"entries": []}, "entries: give at least one output entry"),
        ({"entries": [_entry(), _entry(".hidden")]}, r"entries\[1\]\.name: '\.hidden' may use only letters"),
        ({"entries": [_entry(channels=0)]}, r"entries\[0\]\.channels: must be positive, got 0"),
        ({"entries": [_entry(dtype=tensor_pb2.DATA_TYPE_UNSPECIFIED)]}, "unknown or unspecified dtype"),
        ({"entries": [_entry(), _entry(dtype=tensor_pb2.DATA_TYPE_UINT8)]}, "entry names must be unique"),
        ({"job_id": "../x"}, "job_id: '../x' may use only letters"),
    ],
)
def test_invalid_requests_are_refused(fields: dict[str, object], message: str) -> None:
    request = _request(**{k: v for k, v in fields.items() if v is not None})
    if fields.get("spec", ...) is None:
        request.ClearField("spec")
    with pytest.raises(InvalidArgument, match=message):
        create_arguments(request, "replica-2")
