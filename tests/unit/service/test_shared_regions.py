"""The registry of shared-memory regions on its own: tickets, descriptor checks, owners, bounds, connections and
offers. Identities are set directly (authentication is the server's business, not the registry's)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchwire.service._auth import ANONYMOUS, Identity
from patchwire.service._errors import FailedPrecondition, NotFound, PermissionDenied
from patchwire.service._shared_regions import Refused, SharedRegions
from patchwire.wire import shared_memory

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")

ALICE = Identity("alice", frozenset({"write"}))
BOB = Identity("bob", frozenset({"write"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> SharedRegions:
    return SharedRegions(ticket_ttl_s=30, clock=clock)


def memfd(nbytes: int = 8192, sealed: bool = True) -> int:
    """A descriptor of a new segment (the caller hands it to the registry, which owns it from then on)."""
    segment = shared_memory.Segment(nbytes, sealed=sealed)
    fd = os.dup(segment.fileno())
    segment.close()
    return fd


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def others(tmp_path: Path) -> Iterator[dict[str, int]]:
    """Descriptors that are no segments."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x" * 4096)
    read_end, write_end = os.pipe()
    a, b = socket.socketpair()
    out = {"regular file": os.open(plain, os.O_RDWR), "pipe": read_end, "socket": a.detach()}
    yield out
    os.close(write_end)
    b.close()


def test_a_region_belongs_to_the_identity_that_asked_for_the_ticket(registry: SharedRegions) -> None:
    connection = registry.connect(os.getuid())
    region_id = registry.register(connection, registry.issue_ticket(ALICE, True), memfd())
    assert len(region_id) == 32
    region = registry.region(region_id, ALICE, True, "batch.shared_memory")
    assert region.owner == "alice" and region.segment.size == shared_memory.HEADER_BYTES + 8192
    with pytest.raises(PermissionDenied, match=r"batch\.shared_memory\.region: the region belongs to another identity"):
        registry.region(region_id, BOB, True, "batch.shared_memory")
    with pytest.raises(PermissionDenied):
        registry.region(region_id, ANONYMOUS, True, "shared_memory")  # (no administrator's exception either)
    with pytest.raises(FailedPrecondition, match="not registered for fetching"):
        registry.region(region_id, ALICE, False, "shared_memory")
    with pytest.raises(NotFound, match="no such region") as info:
        registry.region(os.urandom(32), ALICE, True, "shared_memory")
    assert "alice" not in str(info.value) and str(os.getpid()) not in str(info.value)
    registry.disconnect(connection)


def test_a_ticket_is_used_once_and_expires(registry: SharedRegions, clock: Clock) -> None:
    connection = registry.connect(os.getuid())
    ticket = registry.issue_ticket(ALICE, True)
    registry.register(connection, ticket, memfd())
    fd = memfd()
    with pytest.raises(Refused, match="unknown or already used"):
        registry.register(connection, ticket, fd)
    assert is_closed(fd), "a refused descriptor is closed"
    late = registry.issue_ticket(ALICE, True)
    clock.now += 30
    fd = memfd()
    with pytest.raises(Refused, match="expired"):
        registry.register(connection, late, fd)
    assert is_closed(fd)
    with pytest.raises(Refused, match="unknown or already used"):
        registry.register(connection, late, memfd())  # (an expired ticket is gone too)
    registry.disconnect(connection)


def test_only_allowed_user_ids_may_connect() -> None:
    registry = SharedRegions(allowed_uids={os.getuid() + 1})
    with pytest.raises(Refused, match=f"user id {os.getuid()} may not share memory"):
        registry.connect(os.getuid())
    assert registry.connect(os.getuid() + 1).uid == os.getuid() + 1
    assert SharedRegions().allowed_uids == {os.getuid()}, "by default only the server's own user id"


@pytest.mark.parametrize("kind", ["regular file", "pipe", "socket"])
def test_descriptors_that_are_not_memfds_are_refused(
    registry: SharedRegions, others: dict[str, int], kind: str
) -> None:
    connection = registry.connect(os.getuid())
    fd = others.pop(kind)
    with pytest.raises(Refused, match="not a memfd segment"):
        registry.register(connection, registry.issue_ticket(ALICE, True), fd)
    assert is_closed(fd)
    for rest in others.values():
        os.close(rest)
    assert registry.count() == 0


def test_posting_needs_a_sealed_segment_and_fetching_a_writable_one(registry: SharedRegions) -> None:
    connection = registry.connect(os.getuid())
    with pytest.raises(Refused, match="not sealed against shrinking"):
        registry.register(connection, registry.issue_ticket(ALICE, True), memfd(sealed=False))
    writable = memfd(sealed=False)
    read_only = shared_memory.reopen_read_only(writable)
    with pytest.raises(Refused, match="read-only: it cannot be fetched into"):
        registry.register(connection, registry.issue_ticket(ALICE, False), read_only)
    region_id = registry.register(connection, registry.issue_ticket(ALICE, False), writable)
    assert registry.region(region_id, ALICE, False, "shared_memory").for_posting is False
    registry.disconnect(connection)


def test_sizes_and_region_counts_are_bounded(clock: Clock) -> None:
    registry = SharedRegions(max_region_bytes=1 << 20, max_regions_per_identity=2, max_regions=3, clock=clock)
    connection = registry.connect(os.getuid())
    with pytest.raises(Refused, match="registers at most 1048576"):
        registry.register(connection, registry.issue_ticket(ALICE, True), memfd(1 << 20))
    for _ in range(2):
        registry.register(connection, registry.issue_ticket(ALICE, True), memfd())
    with pytest.raises(Refused, match="an identity may hold at most 2 regions"):
        registry.register(connection, registry.issue_ticket(ALICE, True), memfd())
    registry.register(connection, registry.issue_ticket(BOB, True), memfd())
    with pytest.raises(Refused, match="maximum of 3 regions"):
        registry.register(connection, registry.issue_ticket(BOB, True), memfd())
    registry.disconnect(connection)
    assert registry.count() == 0
    registry.register(registry.connect(os.getuid()), registry.issue_ticket(ALICE, True), memfd())  # room again


def test_closing_a_connection_drops_its_regions_and_offers(registry: SharedRegions) -> None:
    mine, other = registry.connect(os.getuid()), registry.connect(os.getuid())
    region_id = registry.register(mine, registry.issue_ticket(ALICE, True), memfd())
    kept = registry.register(other, registry.issue_ticket(ALICE, True), memfd())
    region = registry.region(region_id, ALICE, True, "shared_memory")
    offered = memfd()
    registry.offer(region, offered)
    registry.disconnect(mine)
    with pytest.raises(NotFound):
        registry.region(region_id, ALICE, True, "shared_memory")
    assert is_closed(offered), "an offer nobody collected is closed with its connection"
    assert registry.region(kept, ALICE, True, "shared_memory").id == kept
    late = memfd()
    registry.offer(region, late)  # (a fetch that finishes after the client went away)
    assert is_closed(late)
    registry.disconnect(other)


def test_offers_are_collected_once_and_only_over_their_connection(registry: SharedRegions) -> None:
    mine, other = registry.connect(os.getuid()), registry.connect(os.getuid())
    region = registry.region(registry.register(mine, registry.issue_ticket(ALICE, False), memfd()), ALICE, False, "x")
    fd = memfd()
    lease = registry.offer(region, fd)
    with pytest.raises(Refused, match="nothing to collect under it on this connection"):
        registry.collect(other, lease)
    assert registry.collect(mine, lease) == fd
    with pytest.raises(Refused, match="nothing to collect"):
        registry.collect(mine, lease)
    os.close(fd)
    registry.disconnect(mine)
    registry.disconnect(other)


def test_offers_waiting_on_a_connection_are_bounded(clock: Clock) -> None:
    registry = SharedRegions(max_offers=2, clock=clock)
    connection = registry.connect(os.getuid())
    region = registry.region(
        registry.register(connection, registry.issue_ticket(ALICE, False), memfd()), ALICE, False, "x"
    )
    fds = [memfd() for _ in range(3)]
    leases = [registry.offer(region, fd) for fd in fds]
    assert is_closed(fds[0]), "the oldest offer is dropped"
    with pytest.raises(Refused):
        registry.collect(connection, leases[0])
    assert registry.collect(connection, leases[2]) == fds[2]
    os.close(fds[2])
    registry.disconnect(connection)
    assert is_closed(fds[1])


def test_unregistering_is_for_the_connection_that_registered(registry: SharedRegions) -> None:
    mine, other = registry.connect(os.getuid()), registry.connect(os.getuid())
    region_id = registry.register(mine, registry.issue_ticket(ALICE, True), memfd())
    with pytest.raises(Refused, match="not registered over this connection"):
        registry.unregister(other, region_id)
    registry.unregister(mine, region_id)
    with pytest.raises(NotFound):
        registry.region(region_id, ALICE, True, "shared_memory")
    registry.disconnect(mine)
    registry.disconnect(other)
