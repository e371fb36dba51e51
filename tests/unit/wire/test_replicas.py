"""Replica ids and job homes: which names are replica ids, what a host name becomes, which home a job id names."""

from __future__ import annotations

import pytest

from patchwire.wire.replicas import MAX_REPLICA_ID_CHARS, check_replica_id, default_replica_id, job_home, new_job_id


@pytest.mark.parametrize("name", ["patchwire-0", "a", "R_1", "9", "x" * MAX_REPLICA_ID_CHARS])
def test_replica_ids(name: str) -> None:
    assert check_replica_id(name) == name


@pytest.mark.parametrize("name", ["", "pw.0", "-pw", "_pw", "pw/0", "pw 0", "pé", "x" * (MAX_REPLICA_ID_CHARS + 1)])
def test_names_that_are_not_replica_ids_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match=r"^--replica-id: .* is not a replica id: use 1 to 63 letters") as refused:
        check_replica_id(name, "--replica-id")
    assert len(str(refused.value)) < 300  # a long name is cut, not echoed whole


@pytest.mark.parametrize(
    ("hostname", "replica_id"),
    [
        ("patchwire-2", "patchwire-2"),
        ("node1.example.org", "node1"),
        ("my host", "my-host"),
        ("-x", "x"),
        ("", "patchwire"),
        (".local", "patchwire"),
        ("h" * 100, "h" * MAX_REPLICA_ID_CHARS),
    ],
)
def test_a_host_name_becomes_a_valid_replica_id(hostname: str, replica_id: str) -> None:
    assert default_replica_id(hostname) == replica_id
    assert check_replica_id(default_replica_id(hostname)) == replica_id


def test_a_job_id_names_its_home_before_its_first_dot() -> None:
    assert job_home("patchwire-1.3f9c0a12b7d4") == "patchwire-1"
    assert job_home("r0.a.b") == "r0"
    assert job_home("brains") is None  # no dot: no home named
    assert job_home("-x.job") is None  # not a replica id before the dot
    assert job_home(".job") is None


def test_new_job_ids_name_their_home_and_differ() -> None:
    ids = {new_job_id("r2") for _ in range(100)}
    assert len(ids) == 100
    assert all(job_home(i) == "r2" and len(i) == len("r2.") + 12 for i in ids)
