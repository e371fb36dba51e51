"""Targets of several replicas and the homes of assembly jobs, without a server: what ``connect`` accepts and what
gRPC is given for it, and rendezvous hashing (deterministic, even, and moving only what it must)."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest

import patchwire.client as pw
from patchwire.client._connection import Connection
from patchwire.client._replicas import BALANCING_OPTIONS, home_replica, parse_target, rendezvous
from patchwire.client._retry import retriable

REPLICAS = ["patchwire-0", "patchwire-1", "patchwire-2"]
KEYS = [f"job-{k}" for k in range(3000)]


def test_one_address_is_passed_to_grpc_as_it_is() -> None:
    for text in ("localhost:50051", "unix:/run/patchwire.sock", " 10.0.0.1:1 "):
        target = parse_target(text)
        assert not target.replicated
        assert target.channel_target() == text.strip() == str(target)
        assert target.channel_options(secure=True) == []  # gRPC's own load balancing and certificate name
    assert parse_target(["h:1"]) == parse_target("h:1")


def test_a_list_balances_over_its_addresses_round_robin() -> None:
    for given in (["10.0.0.1:1", "10.0.0.2:2"], ("10.0.0.1:1", "10.0.0.2:2"), "10.0.0.1:1, 10.0.0.2:2"):
        target = parse_target(given)
        assert target.replicated and target.addresses == ("10.0.0.1:1", "10.0.0.2:2")
        assert str(target) == "10.0.0.1:1,10.0.0.2:2"
        assert target.channel_target() == "ipv4:10.0.0.1:1,10.0.0.2:2"
    options = dict(parse_target("10.0.0.1:1,10.0.0.2:2").channel_options(secure=False))
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert "grpc.ssl_target_name_override" not in options
    assert parse_target("[::1]:1,[::2]:2").channel_target() == "ipv6:[::1]:1,[::2]:2"


def test_host_names_in_a_list_are_resolved_and_certificates_checked_against_the_first() -> None:
    target = parse_target(["localhost:7001", "127.0.0.2:7002"])
    assert target.channel_target().startswith("ipv4:127.0.0.1:7001,")  # (IPv4 where a name has both kinds)
    assert target.channel_target().endswith(",127.0.0.2:7002")
    assert ("grpc.ssl_target_name_override", "localhost") in target.channel_options(secure=True)
    replica = target.replica("127.0.0.2:7002")  # one replica, checked against the same name
    assert replica.channel_options(secure=True) == [("grpc.ssl_target_name_override", "localhost")]


def test_a_dns_name_is_resolved_by_grpc_and_by_the_directory() -> None:
    target = parse_target("dns:///localhost:7001")
    assert target.replicated and (target.dns_name, target.port) == ("localhost", 7001)
    assert str(target) == target.channel_target() == "dns:///localhost:7001"
    assert target.channel_options(secure=False) == BALANCING_OPTIONS
    assert "127.0.0.1:7001" in target.resolve()
    replica = target.replica("127.0.0.1:7001")  # a resolved address is checked against the DNS name
    assert replica.channel_options(secure=True) == [("grpc.ssl_target_name_override", "localhost")]
    assert replica.channel_target() == "127.0.0.1:7001" and not replica.replicated


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "target: empty"),
        ([], "an empty replica address"),
        ("a:1,,b:2", "an empty replica address"),
        ("a:1,a:1", "a replica is given twice"),
        ("a:1,b", "expected HOST:PORT"),
        (["a:1", "b:0"], "with a port from 1 to 65535"),
        (["a:1", "::1:2"], "expected HOST:PORT"),
        (["a:1", "dns:///b:2"], "a list holds HOST:PORT addresses only"),
        ("dns://8.8.8.8/name:1", "no DNS server named"),
        ("dns:///name", "expected HOST:PORT"),
        ("dns:///10.0.0.1:1", "takes a name to resolve"),
    ],
)
def test_targets_that_cannot_be_used_are_refused(given: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target(given)


def test_a_connection_keeps_its_target_through_pickling() -> None:
    for given in ("h:1", ["10.0.0.1:1", "10.0.0.2:2"], "dns:///localhost:7001"):
        connection = Connection(given)
        copy = pickle.loads(pickle.dumps(connection))
        assert copy.target == connection.target and copy.address == connection.address
        assert copy.replicated == (given != "h:1")
        assert copy.reopened().target == connection.target


def test_rendezvous_is_the_same_whatever_the_order() -> None:
    for key in KEYS[:200]:
        assert rendezvous(key, REPLICAS) == rendezvous(key, reversed(REPLICAS)) in REPLICAS
    with pytest.raises(ValueError, match="no replicas"):
        rendezvous("job", [])


def test_rendezvous_spreads_keys_evenly() -> None:
    counts = Counter(rendezvous(key, REPLICAS) for key in KEYS)
    assert set(counts) == set(REPLICAS)
    assert all(abs(n - len(KEYS) / 3) < 0.1 * len(KEYS) / 3 for n in counts.values()), counts


def test_rendezvous_moves_only_the_keys_of_a_replica_that_leaves_or_joins() -> None:
    before = {key: rendezvous(key, REPLICAS) for key in KEYS}
    without = {key: rendezvous(key, REPLICAS[:2]) for key in KEYS}
    assert all(without[k] == before[k] for k in KEYS if before[k] != REPLICAS[2])
    joined = {key: rendezvous(key, [*REPLICAS, "patchwire-3"]) for key in KEYS}
    moved = [k for k in KEYS if joined[k] != before[k]]
    assert all(joined[k] == "patchwire-3" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.35  # about a quarter goes to the new replica, nothing else moves


def test_a_job_id_that_names_its_home_goes_there_and_others_by_rendezvous() -> None:
    assert home_replica("patchwire-1.3f9c0a12b7d4", REPLICAS) == "patchwire-1"
    assert home_replica("elsewhere.job", REPLICAS) == "elsewhere"  # named, even where not seen (yet)
    assert home_replica("brains", REPLICAS) == rendezvous("brains", REPLICAS)


def test_no_replica_to_send_a_call_to_is_retried_like_an_unreachable_server() -> None:
    assert retriable(pw.ServerUnavailable("no replica 'r1' answers at dns:///x:1"))
    assert retriable(pw.ServerUnavailable("no replica answers"), read=True)
