"""The posting-segment transport: prediction payloads are copied into slots of one sealed shared-memory segment the
server reads them from, and only the batch message travels. Where the segment cannot be registered it posts over
the wire from then on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from patchwire.client import _shared_memory as process
from patchwire.client._errors import ConnectionFailed
from patchwire.client._shared_memory import UNUSABLE, Registration
from patchwire.client.assembly.posting import Request
from patchwire.client.assembly.transports.base import Transport
from patchwire.client.assembly.transports.wire import WireTransport
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import shared_memory
from patchwire.wire.batches import DecodedBatch

__all__ = ["SLOT_GRANULE", "PostSlots", "PostingSegment"]

_log = logging.getLogger(__name__)
SLOT_GRANULE = 1 << 20
"""Posting slots are sized in multiples of this, so that batches a little larger than the first keep their segment."""


class PostSlots:
    """Where posted payloads lie for the server to read: ``window`` slots of one sealed segment, the n-th batch in slot
    n % window. A slot is reused only once the batch before it in that slot is acknowledged: the assembler has at most
    ``window - 1`` batches in flight when it posts the next."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.segment: shared_memory.Segment | None = None
        self.slot_bytes = 0
        self._posted = 0

    def fits(self, nbytes: int) -> bool:
        return self.segment is not None and nbytes <= self.slot_bytes

    def replace(self, nbytes: int) -> None:
        """A segment with slots of at least ``nbytes`` (call with no batch in flight): the spare one of an earlier
        assembler where it is large enough, else a new one."""
        self.close(spare=True)
        need = self.window * (-(-nbytes // SLOT_GRANULE) * SLOT_GRANULE)
        self.segment = process.SPARES.take_posting(need) or shared_memory.Segment(
            need, sealed=True, name="patchwire-post"
        )
        capacity = self.segment.size - shared_memory.HEADER_BYTES
        self.slot_bytes = capacity // self.window // SLOT_GRANULE * SLOT_GRANULE

    def place(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray], region: bytes) -> None:
        """Copies ``payloads`` into the next slot (one copy each, strided ones included) and points ``batch`` at them
        (``region``: the segment's)."""
        assert self.segment is not None
        base = shared_memory.HEADER_BYTES + (self._posted % self.window) * self.slot_bytes
        offsets, _ = shared_memory.layout([p.nbytes for p in payloads], base)
        for offset, payload in zip(offsets, payloads, strict=True):
            target = self.segment.view(offset, payload.nbytes).view(payload.dtype).reshape(payload.shape)
            np.copyto(target, payload, casting="no")
        batch.shared_memory.region = region
        batch.shared_offsets.extend(offsets)
        self._posted += 1

    def close(self, spare: bool) -> None:
        """Closes the segment; ``spare``: keeps it for the next assembler instead (only with no batch in flight:
        nothing reads its slots any more)."""
        if self.segment is not None:
            if spare:
                process.SPARES.give_posting(self.segment)
            else:
                self.segment.close()
            self.segment = None


class PostingSegment(Transport):
    """Posts through :class:`PostSlots`; fetches over ``wire``, and posts over it too once the segment cannot be
    registered (e.g. the server restarted elsewhere). ``drain``: waits for every batch in flight (before the segment
    is replaced by a larger one, whose old slots may still be read)."""

    name = "posting segment"

    def __init__(self, registration: Registration, window: int, drain: Callable[[], None], wire: WireTransport) -> None:
        self.slots = PostSlots(window)
        self.wire = wire
        self.statistics = wire.statistics
        self._registration = registration
        self._drain = drain
        self._usable = True

    @property
    def shared(self) -> bool:
        return self._usable

    def post(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        if not self._usable or not payloads:
            return self.wire.post(batch, payloads)
        _, nbytes = shared_memory.layout([p.nbytes for p in payloads], 0)
        if not self.slots.fits(nbytes):
            self._drain()  # the old segment's slots may still be read for the batches in flight
            self.slots.replace(nbytes)
        assert self.slots.segment is not None
        try:
            region = self._registration.register(self.slots.segment, for_posting=True)
        except ConnectionFailed:  # (an OSError too: the server stayed unreachable, not unusable)
            raise
        except UNUSABLE as exc:  # e.g. the server restarted elsewhere
            _log.info("cannot register a segment with the server (%s); predictions go over the wire", exc)
            self._usable = False
            return self.wire.post(batch, payloads)
        self.slots.place(batch, payloads, region)
        self.statistics.posted_shared_bytes += sum(p.nbytes for p in payloads)
        return [apb.PostPredictionsRequest(batch=batch)]

    def fetch(self, request: apb.FetchSubjectRequest, what: str) -> DecodedBatch:
        return self.wire.fetch(request, what)

    def resending(self, batches: Sequence[list[Request]]) -> None:
        """Points the batches sent again at the posting segment's region as registered now: a server that restarted
        dropped the old registration with its socket (every batch in flight lies in the current segment). Where the
        segment cannot be registered again, they keep the old region (and the server says it is unknown)."""
        shared = [
            r.batch
            for requests in batches
            for r in requests
            if isinstance(r, apb.PostPredictionsRequest) and r.batch.HasField("shared_memory")
        ]
        if not shared or self.slots.segment is None:
            return
        try:
            region = self._registration.register(self.slots.segment, for_posting=True)
        except ConnectionFailed:  # (an OSError too: the server stayed unreachable, not unusable)
            raise
        except UNUSABLE as exc:
            _log.info("cannot register the posting segment again (%s)", exc)
            return
        for batch in shared:
            batch.shared_memory.region = region

    def close(self, idle: bool) -> None:
        self.slots.close(spare=idle)
