"""RemoteSubjectAssembler: pymia's SubjectAssembler, with the assembly done by the server.

::

    assembler = client.assembler(dataset)                   # pymia: assm.SubjectAssembler(dataset)
    assembler.add_batch(numpy_prediction, sample_indices, is_last)
    for subject_index in assembler.subjects_ready:
        subject_prediction = assembler.get_assembled_subject(subject_index)

Differences from pymia, all deliberate: a subject is ready when every sample index expected for it has arrived
(pymia infers it from arrival order, which breaks with shuffling or several clients); ``last_batch=True`` still
finishes every subject that received something, as in pymia. Volumes keep the dtype of the predictions (pymia:
float64). Overlapping predictions can be averaged or Gaussian-blended instead of overwritten. Batches are
acknowledged only once durable on the server and re-posting a batch never counts it twice, so ``add_batch``
retries transparently when the connection drops or the server restarts: unacknowledged batches are sent again, with
exponential backoff and full jitter, for up to ``RetryPolicy.budget_s`` (60 s by default; see
:mod:`patchwire.client._retry`). Reads (``status``, ``fetch``, ``events``, ``export``) retry the same way.

On the server's host, predictions and assembled volumes skip the wire: predictions are copied through shared-memory
segments (``shared_memory``, see :mod:`patchwire.wire.shared_memory`), finished volumes are mapped from where the server
holds them (its files, or its memory lent until the arrays on it are gone), and only the small messages that say
where they lie travel over gRPC. Segments are handed to the server over its Unix socket (one connection per process
and server, made anew in a forked child) and registered as regions; the server's files come back over the same
connection. The assembler finds out once, on first use, whether it can register a segment (same host, a socket it
can reach, a user id the server allows, shared memory not turned off on the server) and uses the wire otherwise.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from patchwire.client._connection import Connection
from patchwire.client._datasource import RemoteDatasource
from patchwire.client._decoding import DecodedBatch, decode_batch, decode_stream
from patchwire.client._errors import (
    ConnectionFailed,
    PatchwireError,
    RetriesExhausted,
    RpcError,
    translate_rpc_errors,
)
from patchwire.client._retry import Outage, RetryPolicy, call_with_retries, retriable
from patchwire.client.conversion import ImageProperties
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import values_pb2
from patchwire.wire import framing, shared_memory, tensors
from patchwire.wire.names import OVERLAP_MODES

__all__ = ["AssemblyEvent", "JobStatus", "RemoteSubjectAssembler", "SubjectProgress"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
FETCH_SUBJECT = "/patchwire.v1.AssemblyService/FetchSubject"
PREDICTION_KEY = "__prediction"  # pymia's key for a plain array prediction
RELEASE_TIMEOUT_S = 10.0
"""How long giving back leases of the server's memory may take (best effort)."""
FETCH_SEGMENT_BYTES = 1 << 36
"""Nominal size of the segment a subject is fetched into: sparse, it uses memory only where the server writes (a
larger subject comes over the wire)."""
SLOT_GRANULE = 1 << 20
"""Posting slots are sized in multiples of this, so that batches a little larger than the first keep their segment."""
_FORMATS = {
    ".nii": apb.EXPORT_FORMAT_NIFTI,
    ".nii.gz": apb.EXPORT_FORMAT_NIFTI,
    ".mha": apb.EXPORT_FORMAT_MHA,
    ".h5": apb.EXPORT_FORMAT_HDF5,
    ".hdf5": apb.EXPORT_FORMAT_HDF5,
}


@dataclass(frozen=True)
class SubjectProgress:
    subject_index: int
    subject: str
    expected: int
    received: int
    missing: int
    state: str
    """'pending', 'in_progress', 'ready' or 'aborted'."""
    forced: bool
    missing_sample_indices: tuple[int, ...]


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    dataset: str
    state: str
    """'active', 'completed' or 'aborted'."""
    overlap: str
    expected: int
    received: int
    subject_count: int
    ready_subject_count: int
    last_event_sequence: int
    resident_buffer_bytes: int
    journalled: bool
    """True: acknowledged predictions are on disk and the job survives a server restart (a server with a state
    folder); False: the job lives in the server's memory."""
    subjects: tuple[SubjectProgress, ...] = ()


@dataclass(frozen=True)
class AssemblyEvent:
    sequence: int
    type: str
    """'subject_ready', 'job_completed' or 'job_aborted'."""
    subject_index: int
    subject: str
    time_unix_ms: int


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def job_status(info: apb.JobInfo, subjects: Sequence[apb.SubjectStatus] = ()) -> JobStatus:
    return JobStatus(
        info.job_id,
        info.dataset,
        _enum_name(apb.JobState, info.state, "JOB_STATE_"),
        _enum_name(apb.OverlapMode, info.overlap_mode, "OVERLAP_MODE_"),
        info.expected_samples,
        info.received_samples,
        info.subject_count,
        info.ready_subject_count,
        info.last_event_sequence,
        info.resident_buffer_bytes,
        info.journalled,
        tuple(
            SubjectProgress(
                s.subject_index,
                s.subject,
                s.expected_samples,
                s.received_samples,
                s.missing_samples,
                _enum_name(apb.SubjectState, s.state, "SUBJECT_STATE_"),
                s.forced,
                tuple(s.missing_sample_indices),
            )
            for s in subjects
        ),
    )


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a TensorFlow tensor
        value = value.numpy()
    return np.asarray(value)


Request = apb.PostPredictionsRequest | bytes  # chunk messages travel pre-serialised


def _with_chunks(batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
    """The batch request, then its tensors' chunk messages as wire bytes (one copy of each payload)."""
    out: list[Request] = [apb.PostPredictionsRequest(batch=batch)]
    for p in payloads:
        out.extend(framing.serialized_chunks(np.ascontiguousarray(p).reshape(-1).data.cast("B")))
    return out


class _PostSlots:
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
        self.segment = _SPARES.take_posting(need) or shared_memory.Segment(need, sealed=True, name="patchwire-post")
        capacity = self.segment.size - shared_memory.HEADER_BYTES
        self.slot_bytes = capacity // self.window // SLOT_GRANULE * SLOT_GRANULE

    def place(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray], region: bytes) -> None:
        """Copies ``payloads`` into the next slot and points ``batch`` at them (``region``: the segment's)."""
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
                _SPARES.give_posting(self.segment)
            else:
                self.segment.close()
            self.segment = None


class _FetchSegments:
    """The segments subjects are fetched into. A segment whose subject's arrays are all gone is used again: the
    server then writes into pages this process already has, where fresh pages cost more than the copy itself on the
    machines measured. At most ``keep`` unused segments are kept (each holds the pages of the largest subject fetched
    into it) and at most ``lent`` are tracked while their arrays live (each keeps a descriptor open)."""

    def __init__(self, keep: int = 2, lent: int = 8) -> None:
        self._keep = keep
        self._lent_max = lent
        self._free: list[shared_memory.Segment] = []
        self._lent = 0
        self._closed = False
        self._lock = threading.Lock()

    def take(self) -> shared_memory.Segment:
        with self._lock:
            if self._free:
                return self._free.pop()
        return shared_memory.Segment(FETCH_SEGMENT_BYTES, sealed=False, name="patchwire-fetch")

    def views(self, segment: shared_memory.Segment, offsets: Sequence[int], sizes: Sequence[int]) -> list[np.ndarray]:
        """The payloads the server wrote into ``segment``, in a mapping of their own: the segment goes back to the
        pool when the last array viewing it is gone (or is closed now if too many are out)."""
        mapping = segment.map(max(o + n for o, n in zip(offsets, sizes, strict=True)))
        with self._lock:
            track = self._lent < self._lent_max
            self._lent += track
        if track:
            weakref.finalize(mapping, self._returned, segment)
        else:
            segment.close()
        return [np.frombuffer(mapping, dtype=np.uint8, count=n, offset=o) for o, n in zip(offsets, sizes, strict=True)]

    def _returned(self, segment: shared_memory.Segment) -> None:
        with self._lock:
            self._lent -= 1
            if not self._closed and len(self._free) < self._keep:
                self._free.append(segment)
                return
        segment.close()

    def give_back(self, segment: shared_memory.Segment) -> None:
        """A segment taken but not lent out (the fetch failed or came over the wire)."""
        with self._lock:
            if not self._closed and len(self._free) < self._keep:
                self._free.append(segment)
                return
        segment.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for segment in free:
            segment.close()


class _Spares:
    """Segments kept for later assemblers of this process: the posting segment of the last one closed (unless it is
    over ``SPARE_POSTING_MAX`` bytes) and the segments subjects are fetched into. A new assembler then writes into
    pages the process already has: fresh pages cost more than the copy itself on the machines measured. A forked
    child starts with none of them (its parent's segments are shared memory with the parent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._posting: shared_memory.Segment | None = None
        self.fetching = _FetchSegments()

    def take_posting(self, nbytes: int) -> shared_memory.Segment | None:
        with self._lock:
            spare = self._posting
            if spare is None or spare.size - shared_memory.HEADER_BYTES < nbytes:
                return None
            self._posting = None
            return spare

    def give_posting(self, segment: shared_memory.Segment) -> None:
        with self._lock:
            keep = segment.size <= SPARE_POSTING_MAX and (self._posting is None or self._posting.size <= segment.size)
            old, self._posting = (self._posting, segment) if keep else (segment, self._posting)
        if old is not None:
            old.close()

    def forget(self) -> None:
        """In a forked child: closes this process's copies of the parent's segments, keeps none of them. (The child
        has one thread: locks another thread of the parent held at the fork are made anew, not waited for.)"""
        self._lock = threading.Lock()
        posting, self._posting = self._posting, None
        fetching, self.fetching = self.fetching, _FetchSegments()
        fetching._lock = threading.Lock()
        fetching.close()
        if posting is not None:
            posting.close()


SPARE_POSTING_MAX = 1 << 30
"""A posting segment larger than this is closed with its assembler rather than kept for the next."""
_SPARES = _Spares()


class _Leases:
    """Leases of a server's memory (``SharedFile.lease``: a volume fetched by mapping the server's memfd) whose
    mappings are gone here, by server address, until they are given back (:meth:`RemoteSubjectAssembler.fetch`,
    ``delete``, ``close``), so that the server may reuse that memory. A forked child inherits its parent's mappings
    and may still read them: a mapping made before a fork never gives its lease back (the server then frees that
    memory with the child's last mapping of it instead of reusing it)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # (a collection inside a locked block may unmap a volume: reentered)
        self._gone: dict[str, list[bytes]] = {}
        self.generation = 0

    def unmapped(self, address: str, lease: bytes, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self._gone.setdefault(address, []).append(lease)

    def take(self, address: str) -> list[bytes]:
        with self._lock:
            return self._gone.pop(address, [])

    def before_fork(self) -> None:
        self.generation += 1

    def forget(self) -> None:
        """In a forked child: its parent gives back its own leases."""
        self._lock = threading.RLock()
        self._gone = {}


_LEASES = _Leases()


class _Channels:
    """This process's connections to servers' shared-memory sockets, one per server address (see
    :class:`patchwire.wire.shared_memory.Channel`). A forked child makes its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_address: dict[str, shared_memory.Channel] = {}

    def get(self, address: str) -> shared_memory.Channel | None:
        with self._lock:
            channel = self._by_address.get(address)
        return channel if channel is not None and channel.usable() else None

    def connect(self, address: str, path: str) -> shared_memory.Channel:
        """The channel to ``address``'s socket at ``path``: the one open, or a new one (a server restarted or moved
        its socket: the old connection is closed)."""
        with self._lock:
            channel = self._by_address.get(address)
            if channel is not None and channel.path == path and channel.usable():
                return channel
            new = shared_memory.Channel(path)
            self._by_address[address] = new
        if channel is not None and channel.pid == os.getpid():
            channel.close()
        return new

    def forget(self) -> None:
        """In a forked child: the parent's connections are the parent's: this process's copies of them are closed
        (the parent's stay open), so that the server drops the parent's regions as soon as the parent lets go."""
        self._lock = threading.Lock()
        channels, self._by_address = self._by_address, {}
        for channel in channels.values():
            channel.close_copy()

    def close(self) -> None:
        """At exit: this process's connections are closed (the server drops their regions at once)."""
        with self._lock:
            channels, self._by_address = self._by_address, {}
        for channel in channels.values():
            if channel.pid == os.getpid():
                channel.close()
            else:
                channel.close_copy()


_CHANNELS = _Channels()
atexit.register(_CHANNELS.close)


def _forget_spares() -> None:
    _SPARES.forget()
    _LEASES.forget()
    _CHANNELS.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_LEASES.before_fork, after_in_child=_forget_spares)


class _PostStream:
    """One PostPredictions stream: requests go through a queue, acknowledgements are read one per batch, in order."""

    def __init__(self, connection: Connection) -> None:
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._responses = connection.post_predictions()(iter(self._queue.get, None))

    def put(self, requests: Sequence[Request]) -> None:
        for r in requests:
            self._queue.put(r)

    def next_ack(self) -> apb.PostPredictionsResponse:
        response: apb.PostPredictionsResponse = next(self._responses)
        return response

    def close(self) -> None:
        self._queue.put(None)
        self._responses.cancel()


class RemoteSubjectAssembler:
    """Posts predictions to an assembly job on the server; see the module docstring.

    ``overlap``: 'overwrite' (pymia), 'average' or 'gaussian'. ``dtype``: the assembled volumes' dtype (default: the
    first batch's). ``entries``: {name: channels} to create the job up front; by default it is created from the
    first batch, like pymia's assembler sizes its buffers. ``job_id``: reuse (or name) a job, e.g. to resume after a
    client restart. ``window``: how many batches may be unacknowledged at once. 1 (the default) makes ``add_batch``
    return only once its batch is durable and report a rejected batch on that very call; a larger window overlaps
    sending with the server's journalling, and ``subjects_ready`` then lags by up to ``window - 1`` batches
    (``flush()``, a last batch and ``close()`` wait for every acknowledgement). ``shared_memory``: None (the
    default) uses shared memory where the server can, True requires it (ValueError where it cannot be used, with
    the reason), False always uses the wire. ``retry``: how long and how often calls are retried while the server
    is unreachable or restarting (default ``RetryPolicy()``: 60 s from the first failure, exponential backoff with
    full jitter); :class:`~patchwire.client.RetriesExhausted` once that runs out.

    ``accepted_samples``, ``duplicate_samples`` and ``resent_batches`` count, over this assembler's life, the samples
    the server took, those it already had (re-posts after a lost acknowledgement), and the batches sent again.
    """

    def __init__(
        self,
        connection: Connection,
        datasource: RemoteDatasource,
        overlap: str = "overwrite",
        dtype: Any = None,
        job_id: str | None = None,
        entries: Mapping[str, int] | None = None,
        retry: RetryPolicy | None = None,
        window: int = 1,
        shared_memory: bool | None = None,
    ) -> None:
        if overlap not in OVERLAP_MODES:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, got {overlap!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._connection = connection
        self.datasource = datasource
        self.overlap = overlap
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.job_id = job_id
        self.retry = retry or RetryPolicy()
        self.accepted_samples = 0
        self.duplicate_samples = 0
        self.resent_batches = 0
        self._created = False
        self._ready: set[int] = set()
        self._single = False
        self._stream: _PostStream | None = None
        self.window = window
        self._inflight: collections.deque[list[Request]] = collections.deque()
        self._last_ack: apb.PostPredictionsResponse | None = None
        self.shared_memory = shared_memory
        self._shared: bool | None = None if shared_memory is not False else False
        self._slots = _PostSlots(window)
        self._fetch_segments = _SPARES.fetching
        self._files_ok = True
        if entries is not None:
            self._create({name: (int(c), self.dtype or np.dtype(np.float32)) for name, c in entries.items()})

    # -- job --------------------------------------------------------------------------------------------------------

    def _create(self, entries: Mapping[str, tuple[int, np.dtype[Any]]]) -> None:
        # The job is named here, not by the server, so that creating it again after a lost response returns the
        # same job instead of making a second one.
        request = apb.CreateJobRequest(
            spec=self.datasource._spec,
            overlap_mode=OVERLAP_MODES[self.overlap],
            job_id=self.job_id or uuid.uuid4().hex[:12],
            entries=[
                apb.OutputEntry(name=name, channels=c, dtype=tensors.dtype_to_proto(dt))
                for name, (c, dt) in entries.items()
            ],
        )
        response = self._retrying("creating an assembly job", lambda: self._connection.assembly.CreateJob(request))
        self.job_id = response.job.job_id
        self._single = list(entries) == [PREDICTION_KEY]
        self._created = True

    def _retrying(self, what: str, call: Callable[[], T], read: bool = False) -> T:
        """``call()`` with gRPC errors translated, retried under ``self.retry`` while the server is unreachable."""

        def attempt() -> T:
            with translate_rpc_errors(what):
                return call()

        return call_with_retries(self.retry, self._connection.address, what, attempt, read)

    def _job(self) -> str:
        if self.job_id is None:
            raise ValueError("the assembly job is created by the first add_batch (or pass entries=...)")
        return self.job_id

    # -- shared memory --------------------------------------------------------------------------------------------

    @property
    def uses_shared_memory(self) -> bool:
        """Whether predictions and volumes go through shared memory (probed on first use)."""
        if self._shared is None:
            self._shared = self._probe_shared_memory()
        return self._shared

    def _probe_shared_memory(self) -> bool:
        required = self.shared_memory is True
        if not shared_memory.available():
            if required:
                raise ValueError("shared_memory=True: this client cannot make segments (it needs Linux)")
            return False
        segment = shared_memory.Segment(0, sealed=True, name="patchwire-probe")
        try:
            self._region(segment, for_posting=True)
        except (RpcError, OSError, shared_memory.SegmentError) as exc:
            # turned off, a server that predates it, another host or container (no socket here), a uid not allowed
            if required:
                raise ValueError(f"shared_memory=True, but the server cannot use it: {exc}") from None
            _log.info("shared memory is not available (%s); predictions go over the wire", exc)
            return False
        finally:
            segment.close()
        return True

    def _region(self, segment: shared_memory.Segment, for_posting: bool) -> bytes:
        """The region ``segment`` is registered as with this assembler's server: registered now where it is not yet
        (over this process's connection to the server's socket). Raises RpcError, OSError (the socket cannot be
        reached) or SegmentError (the server refused it, with the reason)."""
        address = self._connection.address
        channel = _CHANNELS.get(address)
        region = None if channel is None else segment.region_on(channel)
        if region is not None:
            return region
        request = apb.RegisterSharedMemoryRequest(for_posting=for_posting)
        register = self._connection.assembly.RegisterSharedMemory
        response = self._retrying("registering shared memory with the server", lambda: register(request), read=True)
        channel = _CHANNELS.connect(address, response.socket_path)
        return segment.register(channel, response.ticket)

    # -- pymia's interface --------------------------------------------------------------------------------------

    def add_batch(self, to_assemble: Any, sample_indices: Any, last_batch: bool = False) -> None:
        """Posts predictions (B, ..., C) of the samples ``sample_indices``: an array, or a dict of arrays as in
        pymia. Torch and TensorFlow tensors are accepted. Returns once the server has made the batch durable."""
        if isinstance(to_assemble, Mapping):
            arrays = {str(k): _as_numpy(v) for k, v in to_assemble.items()}
        else:
            arrays = {PREDICTION_KEY: _as_numpy(to_assemble)}
        indices = [int(i) for i in _as_numpy(sample_indices).reshape(-1)]
        for key, arr in arrays.items():
            if arr.ndim < 2 or len(arr) != len(indices):
                raise ValueError(
                    f"predictions {key!r}: expected shape (batch, ..., channels) with batch "
                    f"{len(indices)}, got {arr.shape}"
                )
            if self.dtype is not None:
                arrays[key] = arr.astype(self.dtype, copy=False)
        if not self._created:
            self._create({k: (int(a.shape[-1]), a.dtype) for k, a in arrays.items()})
        self._post(self._requests(arrays, indices, last_batch), last_batch)

    def _requests(self, arrays: Mapping[str, np.ndarray], indices: list[int], last_batch: bool) -> list[Request]:
        batch = apb.PredictionBatch(job_id=self._job(), sample_indices=indices, last_batch=last_batch)
        payloads: list[np.ndarray] = []
        for key, arr in arrays.items():
            tensor, payload = tensors.detached_tensor(arr)
            batch.fields.add(key=key, stacked=tensor)
            if payload is not None:
                payloads.append(payload)
        return self._with_payloads(batch, payloads)

    def _with_payloads(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        """The requests that post ``batch``: its payloads copied into shared memory, or as chunks after it."""
        if not payloads or not self.uses_shared_memory:
            return _with_chunks(batch, payloads)
        _, nbytes = shared_memory.layout([p.nbytes for p in payloads], 0)
        if not self._slots.fits(nbytes):
            self.flush()  # the old segment's slots may still be read for the batches in flight
            self._slots.replace(nbytes)
        assert self._slots.segment is not None
        try:
            region = self._region(self._slots.segment, for_posting=True)
        except (RpcError, OSError, shared_memory.SegmentError) as exc:  # e.g. the server restarted elsewhere
            _log.info("cannot register a segment with the server (%s); predictions go over the wire", exc)
            self._shared = False
            return _with_chunks(batch, payloads)
        self._slots.place(batch, payloads, region)
        return [apb.PostPredictionsRequest(batch=batch)]

    def add_samples(
        self, predictions: Mapping[str, Sequence[np.ndarray]], sample_indices: Sequence[int], last_batch: bool = False
    ) -> None:
        """Like add_batch for samples whose predictions differ in shape (e.g. clamped border patches)."""
        if not self._created:
            self._create({k: (int(v[0].shape[-1]), self.dtype or v[0].dtype) for k, v in predictions.items()})
        batch = apb.PredictionBatch(job_id=self._job(), sample_indices=list(sample_indices), last_batch=last_batch)
        payloads: list[np.ndarray] = []
        for key, values in predictions.items():
            field = batch.fields.add(key=key)
            field.per_sample.SetInParent()
            for v in values:
                arr = _as_numpy(v)
                tensor, payload = tensors.detached_tensor(
                    arr if self.dtype is None else arr.astype(self.dtype, copy=False)
                )
                field.per_sample.values.append(values_pb2.Value(tensor=tensor))
                if payload is not None:
                    payloads.append(payload)
        self._post(self._with_payloads(batch, payloads), last_batch)

    def _post(self, requests: list[Request], last_batch: bool) -> None:
        """Sends a batch; waits for acknowledgements while ``window`` batches are unacknowledged (all of them after
        a last batch)."""
        self._inflight.append(requests)
        if self._stream is None:
            self._stream = _PostStream(self._connection)
        self._stream.put(requests)
        while self._inflight and (last_batch or len(self._inflight) >= self.window):
            self._read_ack()

    def flush(self) -> None:
        """Waits until every batch sent so far is acknowledged (durable on the server)."""
        while self._inflight:
            self._read_ack()

    def _read_ack(self) -> None:
        """Reads the oldest batch's acknowledgement. A dropped connection (the server unreachable, restarting, or
        ending the stream early) is retried under ``self.retry`` by re-sending every unacknowledged batch (posting is
        idempotent); a batch the server rejects raises, and the batches sent after it (which the server never read)
        are sent again first."""
        what = f"posting predictions to assembly job {self.job_id!r}"
        outage: Outage | None = None
        while True:
            try:
                with translate_rpc_errors(what):
                    assert self._stream is not None
                    response = self._stream.next_ack()
                break
            except (ConnectionFailed, StopIteration) as exc:
                # ConnectionFailed is UNAVAILABLE or DEADLINE_EXCEEDED: the batches in flight were not acknowledged
                self._drop_stream()
                failure = exc if isinstance(exc, ConnectionFailed) else ConnectionFailed(f"{what}: stream ended early")
                outage = outage or Outage(self.retry, self._connection.address, what)
                try:
                    outage.failed(failure)
                except RetriesExhausted:
                    self._inflight.clear()
                    raise
                self.resent_batches += len(self._inflight)
                self._resend()
            except BaseException:
                self._drop_stream()
                self._inflight.popleft()
                self._resend()
                raise
        self._inflight.popleft()
        self._last_ack = response
        self.accepted_samples += response.accepted_samples
        self.duplicate_samples += response.duplicate_samples
        self._ready.update(int(s) for s in response.ready_subjects)

    def _resend(self) -> None:
        if self._inflight:
            self._refresh_regions()
            self._stream = _PostStream(self._connection)
            for requests in self._inflight:
                self._stream.put(requests)

    def _refresh_regions(self) -> None:
        """Points the unacknowledged batches at the posting segment's region as registered now: a server that
        restarted dropped the old registration with its socket (every batch in flight lies in the current segment).
        Where the segment cannot be registered again, they keep the old region (and the server says it is unknown)."""
        shared = [
            r.batch
            for requests in self._inflight
            for r in requests
            if isinstance(r, apb.PostPredictionsRequest) and r.batch.HasField("shared_memory")
        ]
        if not shared or self._slots.segment is None:
            return
        try:
            region = self._region(self._slots.segment, for_posting=True)
        except (RpcError, OSError, shared_memory.SegmentError) as exc:
            _log.info("cannot register the posting segment again (%s)", exc)
            return
        for batch in shared:
            batch.shared_memory.region = region

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    @property
    def subjects_ready(self) -> set[int]:
        """Subjects assembled and not fetched yet (a copy, as in pymia)."""
        return set(self._ready)

    def get_assembled_subject(self, subject_index: int) -> Any:
        """The assembled volume (z, y, x, channels): an array for array predictions, else a dict of arrays."""
        arrays, _ = self.fetch(subject_index)
        self._ready.discard(subject_index)
        return arrays[PREDICTION_KEY] if self._single and PREDICTION_KEY in arrays else arrays

    # -- beyond pymia ---------------------------------------------------------------------------------------------

    def fetch(self, subject_index: int) -> tuple[dict[str, np.ndarray], ImageProperties]:
        """Every entry of an assembled subject and the subject's image properties (the original geometry)."""
        what = f"fetching subject {subject_index} of assembly job {self.job_id!r}"
        return call_with_retries(self.retry, self._connection.address, what, lambda: self._fetch(subject_index), True)

    def _fetch(self, subject_index: int) -> tuple[dict[str, np.ndarray], ImageProperties]:
        request = apb.FetchSubjectRequest(job_id=self._job(), subject_index=int(subject_index))
        what = f"fetching subject {subject_index} of assembly job {self.job_id!r}"
        decoded = None
        if self.uses_shared_memory:
            self._give_back_leases()
            segment = None
            try:
                segment = self._fetch_segments.take()
                request.shared_memory.region = self._region(segment, for_posting=False)
            except (OSError, RpcError, shared_memory.SegmentError) as exc:  # e.g. a file-size limit, a server moved
                _log.info("cannot fetch through shared memory (%s); fetching over the wire", exc)
                if segment is not None:
                    self._fetch_segments.give_back(segment)
            else:
                request.accept_files = self._files_ok
                with translate_rpc_errors(what):
                    decoded = self._fetched(self._connection.raw_stream(FETCH_SUBJECT)(request), segment)
                if decoded is None:  # the server's files could not be mapped here: into the segment, then
                    self._files_ok = False
                    request.accept_files = False
                    with translate_rpc_errors(what):
                        decoded = self._fetched(self._connection.raw_stream(FETCH_SUBJECT)(request), segment)
        if decoded is None:
            request.ClearField("shared_memory")
            with translate_rpc_errors(what):
                (decoded,) = list(decode_stream(self._connection.raw_stream(FETCH_SUBJECT)(request)))
        sample = decoded.sample(0)
        properties = sample.pop("properties")
        return sample, properties

    def _fetched(self, responses: Iterator[bytes], segment: shared_memory.Segment) -> DecodedBatch | None:
        """A FetchSubject response stream whose payloads the server wrote into ``segment``, or named as files to map,
        or (where the subject did not fit) sent as chunks after the batch. The segment is lent out with the arrays,
        or given back. None: the server's files could not be mapped here."""
        try:
            first = next(responses)
            message = apb.FetchSubjectResponse.FromString(first)
            if message.shared_files:
                for _ in responses:
                    raise ConnectionFailed("the server sent chunks after a subject it named files for")
                sizes = [t.chunked_nbytes for t in framing.batch_tensors(message.batch) if t.chunked_nbytes]
                if len(sizes) != len(message.shared_files):
                    raise ConnectionFailed(
                        f"the server named {len(message.shared_files)} files for {len(sizes)} payloads"
                    )
                mapped = [self._map(f, n) for f, n in zip(message.shared_files, sizes, strict=True)]
                payloads = [m for m in mapped if m is not None]
                if len(payloads) < len(mapped):
                    return None  # (the caller asks again, with the same segment)
                self._fetch_segments.give_back(segment)
                return decode_batch(message.batch, payloads)
            if not message.shared_offsets:  # the subject did not fit: it came over the wire
                (decoded,) = list(decode_stream(itertools.chain([first], responses)))
                self._fetch_segments.give_back(segment)
                return decoded
            for _ in responses:  # nothing follows the batch: read the stream to its end
                raise ConnectionFailed("the server sent chunks after a subject it wrote into shared memory")
            sizes = [t.chunked_nbytes for t in framing.batch_tensors(message.batch) if t.chunked_nbytes]
            offsets = list(message.shared_offsets)
            if len(sizes) != len(offsets):
                raise ConnectionFailed(f"the server gave {len(offsets)} offsets for {len(sizes)} payloads")
        except BaseException:
            self._fetch_segments.give_back(segment)
            raise
        return decode_batch(message.batch, self._fetch_segments.views(segment, offsets, sizes))

    def _map(self, ref: apb.SharedFile, nbytes: int) -> np.ndarray | None:
        """A server's file, collected over this process's connection to its socket and mapped here privately; the
        lease of one that is the server's memory is given back once the mapping is gone (at once where it could not
        be mapped). None where it cannot be collected or mapped."""
        array = None
        channel = _CHANNELS.get(self._connection.address)
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
            address, generation = self._connection.address, _LEASES.generation
            if array is None:
                _LEASES.unmapped(address, ref.lease, generation)
            else:
                weakref.finalize(shared_memory.mapping_of(array), _LEASES.unmapped, address, ref.lease, generation)
        return array

    def _give_back_leases(self) -> None:
        """Tells the server which of its memory this process no longer maps (best effort: memory whose lease never
        comes back is freed instead of reused)."""
        leases = _LEASES.take(self._connection.address)
        if not leases:
            return
        try:
            self._connection.assembly.ReleaseSharedFiles(
                apb.ReleaseSharedFilesRequest(leases=leases), timeout=RELEASE_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            _log.info("could not give back %d leases of the server's memory: %s", len(leases), exc)

    def status(self, max_missing: int = 16) -> JobStatus:
        """Job and per-subject progress: expected, received, missing (the first ``max_missing`` indices), state."""
        request = apb.GetJobStatusRequest(job_id=self._job(), max_missing=max_missing)
        what = f"reading the status of assembly job {self.job_id!r}"
        response = self._retrying(what, lambda: self._connection.assembly.GetJobStatus(request), read=True)
        return job_status(response.job, response.subjects)

    def events(self, from_sequence: int = 1) -> Iterator[AssemblyEvent]:
        """Subject-ready (and job) events from ``from_sequence`` on: past ones first, then live ones until the job
        completes or is aborted. Closing the iterator cancels the stream. A broken stream is opened again (under
        ``self.retry``) from the event after the last one seen, so no event is lost or repeated."""
        what = f"following events of assembly job {self.job_id!r}"
        job_id = self._job()
        outage: Outage | None = None
        while True:
            request = apb.SubscribeEventsRequest(job_id=job_id, from_sequence=from_sequence)
            call = self._connection.assembly.SubscribeEvents(request)
            try:
                with translate_rpc_errors(what):
                    for response in call:
                        e = response.event
                        outage = None
                        from_sequence = e.sequence + 1
                        yield AssemblyEvent(
                            e.sequence,
                            _enum_name(apb.EventType, e.type, "EVENT_TYPE_"),
                            e.subject_index,
                            e.subject,
                            e.time_unix_ms,
                        )
                return
            except PatchwireError as exc:
                if not retriable(exc, read=True):
                    raise
                outage = outage or Outage(self.retry, self._connection.address, what)
                outage.failed(exc)
            finally:
                call.cancel()

    def export(self, subject_index: int, path: str | Path, entry: str | None = None) -> Path:
        """Writes an assembled subject to ``path``: .nii/.nii.gz or .mha (original geometry), .h5 (pymia format)."""
        path = Path(path)
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
        if suffix not in _FORMATS:
            raise ValueError(f"cannot tell the format of {path.name!r}: use {', '.join(_FORMATS)}")
        request = apb.ExportSubjectRequest(
            job_id=self._job(), subject_index=int(subject_index), format=_FORMATS[suffix], entry=entry or ""
        )
        tmp = path.with_name(f".{path.name}.part")
        what = f"exporting subject {subject_index} of assembly job {self.job_id!r}"

        def write() -> int | None:  # (a retry writes the file from its start)
            size = None
            with translate_rpc_errors(what), open(tmp, "wb") as f:
                for response in self._connection.assembly.ExportSubject(request):
                    if response.WhichOneof("payload") == "file":
                        size = response.file.size
                    else:
                        f.write(response.data)
            return size

        try:
            size = call_with_retries(self.retry, self._connection.address, what, write, read=True)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a refused or broken export leaves no partial file behind
            raise
        if size is None or tmp.stat().st_size != size:
            tmp.unlink(missing_ok=True)
            raise ConnectionFailed(f"export of subject {subject_index} ended early")
        tmp.replace(path)
        return path

    def abort(self) -> JobStatus:
        with translate_rpc_errors(f"aborting assembly job {self.job_id!r}"):
            response = self._connection.assembly.AbortJob(apb.AbortJobRequest(job_id=self._job()))
        return job_status(response.job)

    def delete(self) -> None:
        """Deletes the job and everything the server holds for it."""
        self._give_back_leases()
        with translate_rpc_errors(f"deleting assembly job {self.job_id!r}"):
            self._connection.assembly.DeleteJob(apb.DeleteJobRequest(job_id=self._job()))
        self._ready.clear()

    def close(self) -> None:
        """Waits for outstanding acknowledgements, then closes the prediction stream and the connection (the job
        stays on the server). Idempotent."""
        try:
            self.flush()
        finally:
            self._drop_stream()
            self._slots.close(spare=not self._inflight)
            self._give_back_leases()
        self._connection.close()

    def __enter__(self) -> RemoteSubjectAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
