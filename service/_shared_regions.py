"""Shared-memory regions: the client segments a server may use, each handed over by its client.

A client gets a one-time *ticket* from RegisterSharedMemory (bound to the caller's identity, for posting or for
fetching, valid ``ticket_ttl_s``), then sends it with its segment's descriptor over the server's Unix socket
(:mod:`patchwire.service._shared_socket`). :meth:`SharedRegions.register` checks, in this order: the peer's user id
(checked when the connection is made: by default only the server's own), the ticket (known, unused, unexpired), the
descriptor (a memfd: a regular file whose seals can be read and whose name is a memfd's; sealed against shrinking
when it will be posted from; writable when it will be fetched into; at most ``max_region_bytes``), and the bounds on
regions (per identity and in total). The region then gets a random 32-byte id, belongs to the ticket's identity and
lives as long as the connection it came over (or until it is unregistered).

Requests name a region by its id (:meth:`SharedRegions.region`): an unknown id is NOT_FOUND, another identity's
region PERMISSION_DENIED, neither saying anything about other regions or about the server's descriptors.

The other way round the server *offers* descriptors of its own to the connection of a region (:meth:`offer`): the
client collects each once, over that connection only (:meth:`collect`). Offers not collected are closed with their
connection, and at most ``max_offers`` wait on one connection (the oldest are dropped).
"""

from __future__ import annotations

import fcntl
import hmac
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from patchwire.service._auth import Identity
from patchwire.service._errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from patchwire.wire import framing, shared_memory

__all__ = ["Connection", "Refused", "Region", "SharedRegions", "named_region", "write_payloads"]

MAX_REGION_BYTES = 1 << 37
"""The largest segment registered by default (128 GiB: fetch segments are sparse and nominally 64 GiB)."""
MAX_REGIONS_PER_IDENTITY = 64
MAX_REGIONS = 1024
MAX_TICKETS = 4096
"""Tickets outstanding at once (the oldest are dropped)."""
MAX_OFFERS = 256
"""Descriptors waiting to be collected on one connection (the oldest are dropped)."""
TICKET_TTL_S = 30.0


class Refused(Exception):
    """A request on the socket is refused; the message (sent to the peer) says why, naming nothing of the server's."""


@dataclass(eq=False)
class Connection:
    """One client connection to the socket: the regions registered and descriptors offered over it."""

    uid: int
    pid: int
    regions: dict[bytes, Region] = field(default_factory=dict)
    offers: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    closed: bool = False


@dataclass(eq=False)
class Region:
    """A registered segment."""

    id: bytes
    owner: str
    """The name of the identity that asked for the ticket."""
    for_posting: bool
    segment: shared_memory.OpenedSegment
    connection: Connection


@dataclass(frozen=True)
class _Ticket:
    owner: str
    for_posting: bool
    expires: float


class SharedRegions:
    """The registry (thread-safe). ``allowed_uids``: the user ids whose processes may register (None: only this
    server's own); ``clock``: monotonic seconds (tests pass their own)."""

    def __init__(
        self,
        allowed_uids: Iterable[int] | None = None,
        max_region_bytes: int = MAX_REGION_BYTES,
        max_regions_per_identity: int = MAX_REGIONS_PER_IDENTITY,
        max_regions: int = MAX_REGIONS,
        ticket_ttl_s: float = TICKET_TTL_S,
        max_offers: int = MAX_OFFERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed_uids = frozenset([os.getuid()] if allowed_uids is None else allowed_uids)
        self.max_region_bytes = max_region_bytes
        self.max_regions_per_identity = max_regions_per_identity
        self.max_regions = max_regions
        self.ticket_ttl_s = ticket_ttl_s
        self.max_offers = max_offers
        self.socket_path = ""
        """Where clients connect (set by the socket that serves this registry)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._tickets: OrderedDict[bytes, _Ticket] = OrderedDict()
        self._regions: dict[bytes, Region] = {}
        self._per_owner: dict[str, int] = {}

    # -- tickets and connections ------------------------------------------------------------------------------------

    def issue_ticket(self, identity: Identity, for_posting: bool) -> bytes:
        """A one-time ticket for ``identity`` (call on the gRPC handler's task, with the caller's identity)."""
        ticket = os.urandom(shared_memory.TICKET_BYTES)
        now = self._clock()
        with self._lock:
            for old in [t for t, v in self._tickets.items() if v.expires <= now]:
                del self._tickets[old]
            while len(self._tickets) >= MAX_TICKETS:
                self._tickets.popitem(last=False)
            self._tickets[ticket] = _Ticket(identity.name, for_posting, now + self.ticket_ttl_s)
        return ticket

    def connect(self, uid: int, pid: int = 0) -> Connection:
        """A new connection from a peer with user id ``uid`` (from SO_PEERCRED); Refused for a uid not allowed."""
        if uid not in self.allowed_uids:
            raise Refused(f"processes of user id {uid} may not share memory with this server")
        return Connection(uid, pid)

    def disconnect(self, connection: Connection) -> None:
        """The connection is gone: its regions are dropped, its offers closed."""
        with self._lock:
            connection.closed = True
            regions = list(connection.regions.values())
            connection.regions.clear()
            offers = list(connection.offers.values())
            connection.offers.clear()
            for region in regions:
                self._forget(region)
        for region in regions:
            region.segment.close()
        for fd in offers:
            os.close(fd)

    # -- regions ------------------------------------------------------------------------------------------------------

    def register(self, connection: Connection, ticket: bytes, fd: int) -> bytes:
        """Registers the segment ``fd`` (this call owns it: closed unless registered) with ``ticket``; the region id.
        Raises Refused with the reason."""
        try:
            with self._lock:
                found = self._tickets.pop(ticket, None) if len(ticket) == shared_memory.TICKET_BYTES else None
            if found is None:
                raise Refused("ticket: unknown or already used (ask RegisterSharedMemory for a new one)")
            if found.expires <= self._clock():
                raise Refused("ticket: expired (ask RegisterSharedMemory for a new one)")
            size = self._check_descriptor(fd, found.for_posting)
            sealed = shared_memory.seals(fd) & shared_memory._SEAL_SHRINK
            segment = shared_memory.OpenedSegment(
                fd, size, readable_map=found.for_posting, writable_map=not found.for_posting and bool(sealed)
            )
        except BaseException:
            os.close(fd)
            raise
        region = Region(os.urandom(shared_memory.REGION_ID_BYTES), found.owner, found.for_posting, segment, connection)
        with self._lock:
            refusal = None
            if connection.closed:
                refusal = "the connection is closed"
            elif len(self._regions) >= self.max_regions:
                refusal = f"this server holds its maximum of {self.max_regions} regions: close some segments"
            elif self._per_owner.get(region.owner, 0) >= self.max_regions_per_identity:
                refusal = f"an identity may hold at most {self.max_regions_per_identity} regions: close some segments"
            else:
                self._regions[region.id] = region
                connection.regions[region.id] = region
                self._per_owner[region.owner] = self._per_owner.get(region.owner, 0) + 1
        if refusal is not None:
            segment.close()
            raise Refused(refusal)
        return region.id

    def _check_descriptor(self, fd: int, for_posting: bool) -> int:
        """The size of a descriptor fit to be a region; Refused otherwise."""
        st = os.fstat(fd)
        try:
            seals = shared_memory.seals(fd)
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            seals, name = -1, ""
        if not stat.S_ISREG(st.st_mode) or seals < 0 or not name.startswith("/memfd:"):
            raise Refused("the descriptor is not a memfd segment (memfd_create)")
        access = _access_mode(fd)
        if for_posting and not seals & shared_memory._SEAL_SHRINK:
            raise Refused("the segment is not sealed against shrinking (F_SEAL_SHRINK): it cannot be posted from")
        if for_posting and access == os.O_WRONLY:
            raise Refused("the segment was handed over write-only: it cannot be posted from")
        if not for_posting and access != os.O_RDWR:
            raise Refused("the segment was handed over read-only: it cannot be fetched into")
        if st.st_size > self.max_region_bytes:
            raise Refused(f"the segment is {st.st_size} bytes; this server registers at most {self.max_region_bytes}")
        return st.st_size

    def unregister(self, connection: Connection, region_id: bytes) -> None:
        """Drops a region registered over ``connection``; Refused for any other."""
        with self._lock:
            region = connection.regions.pop(region_id, None)
            if region is not None:
                self._forget(region)
        if region is None:
            raise Refused("region: not registered over this connection")
        region.segment.close()

    def _forget(self, region: Region) -> None:
        del self._regions[region.id]
        left = self._per_owner[region.owner] - 1
        if left:
            self._per_owner[region.owner] = left
        else:
            del self._per_owner[region.owner]

    def region(self, region_id: bytes, identity: Identity, for_posting: bool, field: str) -> Region:
        """The region a request names, for the caller ``identity``: NotFound where it is unknown, PermissionDenied
        where it belongs to another identity, FailedPrecondition where it was registered for the other direction."""
        with self._lock:
            region = self._regions.get(bytes(region_id))
        if region is None:
            raise NotFound(
                f"{field}.region: no such region (never registered, unregistered, or its socket connection closed): "
                "register the segment again"
            )
        if not hmac.compare_digest(region.owner.encode(), identity.name.encode()):
            raise PermissionDenied(f"{field}.region: the region belongs to another identity")
        if region.for_posting != for_posting:
            wanted = "posting" if for_posting else "fetching"
            raise FailedPrecondition(f"{field}.region: the region was not registered for {wanted}")
        return region

    def count(self) -> int:
        with self._lock:
            return len(self._regions)

    # -- descriptors offered to clients -----------------------------------------------------------------------------

    def offer(self, region: Region, fd: int) -> bytes:
        """Offers the descriptor ``fd`` (this call owns it) to the connection ``region`` came over; the lease to
        collect it with."""
        return self.offer_as(region, os.urandom(16), fd)

    def offer_as(self, region: Region, lease: bytes, fd: int) -> bytes:
        """:meth:`offer` under a given lease (e.g. a lease of the server's memory)."""
        dropped: list[int] = []
        with self._lock:
            connection = region.connection
            if connection.closed:
                dropped.append(fd)
            else:
                old = connection.offers.pop(lease, None)
                if old is not None:
                    dropped.append(old)
                connection.offers[lease] = fd
                while len(connection.offers) > self.max_offers:
                    dropped.append(connection.offers.popitem(last=False)[1])
        for old in dropped:
            os.close(old)
        return lease

    def collect(self, connection: Connection, lease: bytes) -> int:
        """The descriptor offered to ``connection`` under ``lease`` (the caller sends and closes it); Refused for a
        lease offered to another connection, already collected, or unknown."""
        with self._lock:
            fd = connection.offers.pop(bytes(lease), None)
        if fd is None:
            raise Refused("lease: nothing to collect under it on this connection")
        return fd


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def named_region(
    regions: SharedRegions | None, region_id: bytes, identity: Identity, for_posting: bool, field: str
) -> Region:
    """The region a request's ``field`` (a SharedMemory message's ``region``) names, for the caller ``identity``
    (see :meth:`SharedRegions.region`); FailedPrecondition where shared memory is off on this server, InvalidArgument
    for an id of the wrong length."""
    if regions is None:
        raise FailedPrecondition(
            f"{field}: shared memory is off on this server (--no-shared-memory): send payloads on the wire"
        )
    if len(region_id) != shared_memory.REGION_ID_BYTES:
        raise InvalidArgument(
            f"{field}.region: a region id is {shared_memory.REGION_ID_BYTES} bytes, got {len(region_id)}"
        )
    return regions.region(region_id, identity, for_posting, field)


def write_payloads(
    segment: shared_memory.OpenedSegment, batch: Any, payloads: Sequence[Any], start: int = shared_memory.HEADER_BYTES
) -> tuple[list[int], int] | None:
    """Writes the payloads of ``batch``'s chunked tensors (``payloads``, in announcement order: each a buffer or a
    list of parts) into a client's segment, one after another from ``start`` (aligned as ``shared_memory.layout``);
    returns their offsets and the end of the last, or None where they do not fit (the wire carries them then).
    Raises FailedPrecondition where the segment cannot be written (shrunk by its client, unregistered meanwhile)."""
    sizes = [t.chunked_nbytes for t in framing.batch_tensors(batch) if t.chunked_nbytes]
    offsets, end = shared_memory.layout(sizes, start)
    try:
        if end > segment.current_size():
            return None
        for offset, payload in zip(offsets, payloads, strict=True):
            segment.write(offset, payload if isinstance(payload, list) else [payload])
    except shared_memory.SegmentError as exc:
        raise FailedPrecondition(f"shared_memory: {exc}") from None
    return offsets, end
