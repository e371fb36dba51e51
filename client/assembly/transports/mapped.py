"""The mapped-volumes transport: a fetched subject's payloads are mapped from where the server holds them (its files,
or its memory lent under a lease) or written by the server into a fetch segment of this process, and only the
message that says where they lie travels. It posts through a :class:`PostingSegment`. Its fall-backs: files that
cannot be mapped here are asked for again into the segment (and not asked for again), a subject that does not fit
the segment comes over the wire, and where no segment can be registered the fetch goes over the wire."""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections.abc import Iterator, Sequence

import numpy as np

from patchwire.client import _shared_memory as process
from patchwire.client._connection import Connection
from patchwire.client._errors import ConnectionFailed, ProtocolError, translate_rpc_errors
from patchwire.client._shared_memory import UNUSABLE, Registration
from patchwire.client.assembly.posting import Request
from patchwire.client.assembly.transports.base import Transport
from patchwire.client.assembly.transports.segment import PostingSegment
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.wire import framing, shared_memory
from patchwire.wire.batches import DecodedBatch, decode_batch

__all__ = ["MappedVolumes", "map_server_file"]

_log = logging.getLogger(__name__)


def map_server_file(address: str, ref: apb.SharedFile, nbytes: int) -> np.ndarray | None:
    """A file of the server at ``address``, collected over this process's connection to its socket and mapped here
    privately; the lease of one that is the server's memory is given back once the mapping is gone (at once where it
    could not be mapped). None where it cannot be collected or mapped."""
    array = None
    channel = process.CHANNELS.get(address)
    if channel is not None:
        try:
            fd = channel.collect(ref.lease)
        except (OSError, shared_memory.SegmentError) as exc:
            _log.info("could not collect a file of the server's (%s)", exc)
        else:
            try:
                array = shared_memory.map_descriptor(fd, ref.offset, nbytes)
            except OSError as exc:  # e.g. no address space left for the mapping
                _log.info("could not map a file of the server's (%s)", exc)
            finally:
                os.close(fd)
    if ref.lent_memory:
        leases = process.LEASES
        generation = leases.generation
        if array is None:
            leases.unmapped(address, ref.lease, generation)
        else:
            weakref.finalize(shared_memory.mapping_of(array), leases.unmapped, address, ref.lease, generation)
    return array


def _chunked_sizes(batch: object) -> list[int]:
    return [t.chunked_nbytes for t in framing.batch_tensors(batch) if t.chunked_nbytes]


class MappedVolumes(Transport):
    """Fetches through shared memory while ``posting`` can use it (over ``posting.wire`` once it cannot); posts
    through ``posting``. ``accept_files``: whether the server may name its files (False once they could not be
    mapped here: volumes are then written into the fetch segment). ``segments``: where fetch segments come from (by
    default the process's, ``process.SPARES.fetching``)."""

    name = "mapped volumes"

    def __init__(
        self,
        connection: Connection,
        registration: Registration,
        posting: PostingSegment,
        segments: process.FetchSegments | None = None,
    ) -> None:
        self.posting = posting
        self.statistics = posting.statistics
        self.accept_files = True
        self._connection = connection
        self._registration = registration
        self._segments = segments or process.SPARES.fetching

    @property
    def shared(self) -> bool:
        return self.posting.shared

    def post(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        return self.posting.post(batch, payloads)

    def resending(self, batches: Sequence[list[Request]]) -> None:
        self.posting.resending(batches)

    def close(self, idle: bool) -> None:
        self.posting.close(idle)

    def fetch(self, request: apb.FetchSubjectRequest, what: str) -> DecodedBatch:
        wire = self.posting.wire
        if not self.shared:
            return wire.fetch(request, what)
        process.give_back_leases(self._connection)
        segment = None
        try:
            segment = self._segments.take()
            request.shared_memory.region = self._registration.register(segment, for_posting=False)
        except ConnectionFailed:  # (an OSError too: the server stayed unreachable, not unusable)
            raise
        except UNUSABLE as exc:  # e.g. a file-size limit, a server moved
            _log.info("cannot fetch through shared memory (%s); fetching over the wire", exc)
            if segment is not None:
                self._segments.give_back(segment)
            return wire.fetch(request, what)
        request.accept_files = self.accept_files
        with translate_rpc_errors(what):
            decoded = self._fetched(wire.open(request), segment)
        if decoded is None:  # the server's files could not be mapped here: into the segment, then
            self.accept_files = False
            request.accept_files = False
            with translate_rpc_errors(what):
                decoded = self._fetched(wire.open(request), segment)
        return decoded if decoded is not None else wire.fetch(request, what)

    def _fetched(self, responses: Iterator[bytes], segment: shared_memory.Segment) -> DecodedBatch | None:
        """A FetchSubject response stream whose payloads the server wrote into ``segment``, or named as files to map,
        or (where the subject did not fit) sent as chunks after the batch. The segment is lent out with the arrays,
        or given back. None: the server's files could not be mapped here."""
        try:
            first = next(responses)
            message = apb.FetchSubjectResponse.FromString(first)
            if message.shared_files:
                for _ in responses:
                    raise ProtocolError("the server sent chunks after a subject it named files for")
                sizes = _chunked_sizes(message.batch)
                if len(sizes) != len(message.shared_files):
                    raise ProtocolError(f"the server named {len(message.shared_files)} files for {len(sizes)} payloads")
                address = self._connection.address
                mapped = [map_server_file(address, f, n) for f, n in zip(message.shared_files, sizes, strict=True)]
                payloads = [m for m in mapped if m is not None]
                if len(payloads) < len(mapped):
                    return None  # (the caller asks again, with the same segment)
                self._segments.give_back(segment)
                self.statistics.fetched_mapped_bytes += sum(sizes)
                return decode_batch(message.batch, payloads)
            if not message.shared_offsets:  # the subject did not fit: it came over the wire
                decoded = self.posting.wire.decode(itertools.chain([first], responses))
                self._segments.give_back(segment)
                return decoded
            for _ in responses:  # nothing follows the batch: read the stream to its end
                raise ProtocolError("the server sent chunks after a subject it wrote into shared memory")
            sizes = _chunked_sizes(message.batch)
            offsets = list(message.shared_offsets)
            if len(sizes) != len(offsets):
                raise ProtocolError(f"the server gave {len(offsets)} offsets for {len(sizes)} payloads")
        except BaseException:
            self._segments.give_back(segment)
            raise
        self.statistics.fetched_shared_bytes += sum(sizes)
        return decode_batch(message.batch, self._segments.views(segment, offsets, sizes))
