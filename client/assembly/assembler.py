"""The facade: RemoteSubjectAssembler, pymia's SubjectAssembler with the assembly done by the server (the user's
guide is the package docstring, :mod:`patchwire.client.assembly`). It turns predictions into batches and hands them to
its posting window (:mod:`~patchwire.client.assembly.posting`) and their payloads to its transport
(:mod:`~patchwire.client.assembly.transports`); jobs, status, events and exports are plain calls with retries.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from patchwire.client import _shared_memory as process
from patchwire.client._connection import Connection
from patchwire.client._datasource import RemoteDatasource
from patchwire.client._errors import PatchwireError, translate_rpc_errors
from patchwire.client._replicas import HomeConnection, Replicas
from patchwire.client._retry import Outage, RetryPolicy, call_with_retries, retriable
from patchwire.client.assembly.export import export_subject
from patchwire.client.assembly.posting import GrpcPostStream, PostingWindow, Request
from patchwire.client.assembly.status import AssemblyEvent, JobStatus, assembly_event, job_status
from patchwire.client.assembly.transports import Registrar, Transport, choose_transport
from patchwire.client.conversion import ImageProperties
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import values_pb2
from patchwire.wire import tensors
from patchwire.wire.names import OVERLAP_MODES

__all__ = ["PREDICTION_KEY", "RemoteSubjectAssembler"]

T = TypeVar("T")
PREDICTION_KEY = "__prediction"  # pymia's key for a plain array prediction


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a TensorFlow tensor
        value = value.numpy()
    return np.asarray(value)


class RemoteSubjectAssembler:
    """Posts predictions to an assembly job on the server; see :mod:`patchwire.client.assembly`.

    ``overlap``: 'overwrite' (pymia), 'average' or 'gaussian'. ``dtype``: the assembled volumes' dtype (default: the
    first batch's). ``entries``: {name: channels} to create the job up front; by default it is created from the
    first batch, like pymia's assembler sizes its buffers. ``job_id``: reuse (or name) a job, e.g. to resume after a
    client restart. ``window``: how many batches may be unacknowledged at once. 1 (the default) makes ``add_batch``
    return only once its batch is durable and report a rejected batch on that very call; a larger window overlaps
    sending with the server's journalling, and ``subjects_ready`` then lags by up to ``window - 1`` batches
    (``flush()``, a last batch and ``close()`` wait for every acknowledgement). ``shared_memory``: None (the
    default) uses shared memory where the server can, True requires it (ValueError where it cannot be used, with
    the reason), False always uses the wire. ``retry``: how long and how often calls are retried while the server
    is unreachable or restarting (default ``RetryPolicy()``: 5 minutes from the first failure, exponential backoff with
    full jitter); :class:`~patchwire.client.RetriesExhausted` once that runs out.

    From a client of several replicas every call of the job goes to its home replica, over a direct connection
    (:class:`~patchwire.client._replicas.HomeConnection`): the replica a ``job_id`` of the form ``<replica_id>.<rest>``
    names (any other id is homed by rendezvous hashing over the replica ids), or, for a new job without ``job_id``,
    one of the replicas that answer, named in the id the assembler makes (``job_id`` then says which). While the home
    is away (restarting) the job's calls wait for it within ``retry``.

    ``accepted_samples``, ``duplicate_samples`` and ``resent_batches`` count, over this assembler's life, the samples
    the server took, those it already had (re-posts after a lost acknowledgement), and the batches sent again;
    ``unacknowledged_batches`` those waiting for their acknowledgement. ``transport`` is how payloads travel, with
    its byte counts in ``transport.statistics``.
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
        if connection.replicated:  # every call of the job goes to its home replica
            connection.close()
            connection = HomeConnection(
                Replicas.of(connection.target, connection.credentials, connection.timeouts), connection.timeouts
            )
            if job_id is not None:
                connection.place(job_id)
        self._posting = PostingWindow(
            lambda: GrpcPostStream(connection),
            lambda: connection.address,
            window,
            retry,
            describe=lambda: f"posting predictions to assembly job {self.job_id!r}",
            resending=self._resending,
            acknowledged=lambda response: self._ready.update(int(s) for s in response.ready_subjects),
        )
        self._connection = connection
        self.datasource = datasource
        self.overlap = overlap
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.job_id = job_id
        self.shared_memory = shared_memory
        self._created = False
        self._ready: set[int] = set()
        self._single = False
        self._transport: Transport | None = None
        if entries is not None:
            self._create({name: (int(c), self.dtype or np.dtype(np.float32)) for name, c in entries.items()})

    retry = property(lambda self: self._posting.retry, lambda self, v: setattr(self._posting, "retry", v))
    window = property(lambda self: self._posting.window, lambda self, v: setattr(self._posting, "window", v))
    accepted_samples = property(lambda self: self._posting.accepted_samples)
    duplicate_samples = property(lambda self: self._posting.duplicate_samples)
    resent_batches = property(lambda self: self._posting.resent_batches)
    unacknowledged_batches = property(lambda self: self._posting.unacknowledged)

    # -- job --------------------------------------------------------------------------------------------------------

    def _create(self, entries: Mapping[str, tuple[int, np.dtype[Any]]]) -> None:
        # The job is named here, not by the server, so that creating it again after a lost response returns the
        # same job instead of making a second one; with several replicas the name says its home.
        job_id = self.job_id
        if job_id is None:
            connection = self._connection
            if isinstance(connection, HomeConnection):
                job_id = self._retrying("choosing a home replica for a new job", connection.replicas.new_job_id)
                connection.place(job_id)
            else:
                job_id = uuid.uuid4().hex[:12]
        request = apb.CreateJobRequest(
            spec=self.datasource._spec,
            overlap_mode=OVERLAP_MODES[self.overlap],
            job_id=job_id,
            entries=[
                apb.OutputEntry(name=name, channels=c, dtype=tensors.dtype_to_proto(dt))
                for name, (c, dt) in entries.items()
            ],
        )
        response = self._retrying(
            "creating an assembly job", lambda: self._connection.assembly.CreateJob(request, timeout=self._unary_s)
        )
        self.job_id = response.job.job_id
        self._single = list(entries) == [PREDICTION_KEY]
        self._created = True

    @property
    def _unary_s(self) -> float:
        """The deadline of the job's unary calls (the connection's ``Timeouts.unary_s``)."""
        return self._connection.timeouts.unary_s

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

    # -- transport --------------------------------------------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """How payloads travel, chosen on first use (:func:`~patchwire.client.assembly.transports.choose_transport`);
        assign one (e.g. a :class:`~patchwire.client.assembly.MemoryTransport`) before that to choose it yourself."""
        if self._transport is None:
            registrar = Registrar(self._connection, self._retrying)
            self._transport = choose_transport(
                self._connection,
                registrar,
                self.shared_memory,
                self.window,
                self._posting.flush,
                # predictions cross the same link as the datasource's samples: compressed where those are
                codec=self.datasource.wire_codec,
            )
        return self._transport

    @transport.setter
    def transport(self, transport: Transport) -> None:
        self._transport = transport

    def _resending(self, batches: Sequence[list[Request]]) -> None:
        if self._transport is not None:
            self._transport.resending(batches)

    @property
    def uses_shared_memory(self) -> bool:
        """Whether predictions and volumes go through shared memory (probed on first use)."""
        return self.transport.shared

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
        batch = apb.PredictionBatch(job_id=self._job(), sample_indices=indices, last_batch=last_batch)
        payloads: list[np.ndarray] = []
        for key, arr in arrays.items():
            tensor, payload = tensors.detached_tensor(arr)
            batch.fields.add(key=key, stacked=tensor)
            if payload is not None:
                payloads.append(payload)
        self._posting.post(self._requests(batch, payloads), last_batch)

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
        self._posting.post(self._requests(batch, payloads), last_batch)

    def _requests(self, batch: apb.PredictionBatch, payloads: Sequence[np.ndarray]) -> list[Request]:
        """The requests that post ``batch``: through the transport, or (nothing to place: no transport is probed for
        it) the batch message alone."""
        return self.transport.post(batch, payloads) if payloads else [apb.PostPredictionsRequest(batch=batch)]

    def flush(self) -> None:
        """Waits until every batch sent so far is acknowledged (durable on the server)."""
        self._posting.flush()

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

        def attempt() -> tuple[dict[str, np.ndarray], ImageProperties]:
            request = apb.FetchSubjectRequest(job_id=self._job(), subject_index=int(subject_index))
            sample = self.transport.fetch(request, what).sample(0)
            properties = sample.pop("properties")
            return sample, properties

        return call_with_retries(self.retry, self._connection.address, what, attempt, True)

    def status(self, max_missing: int = 16) -> JobStatus:
        """Job and per-subject progress: expected, received, missing (the first ``max_missing`` indices), state."""
        request = apb.GetJobStatusRequest(job_id=self._job(), max_missing=max_missing)
        what = f"reading the status of assembly job {self.job_id!r}"
        response = self._retrying(
            what, lambda: self._connection.assembly.GetJobStatus(request, timeout=self._unary_s), read=True
        )
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
            call = None
            try:
                with translate_rpc_errors(what):
                    call = self._connection.assembly.SubscribeEvents(request)
                    for response in call:
                        outage = None
                        from_sequence = response.event.sequence + 1
                        yield assembly_event(response.event)
                return
            except PatchwireError as exc:
                if not retriable(exc, read=True):
                    raise
                outage = outage or Outage(self.retry, self._connection.address, what)
                outage.failed(exc)
            finally:
                if call is not None:
                    call.cancel()

    def export(self, subject_index: int, path: str | Path, entry: str | None = None) -> Path:
        """Writes an assembled subject to ``path``: .nii/.nii.gz or .mha (original geometry), .h5 (pymia format)."""
        what = f"exporting subject {subject_index} of assembly job {self.job_id!r}"
        return export_subject(self._connection, self.retry, self._job, subject_index, path, entry, what)

    def abort(self) -> JobStatus:
        with translate_rpc_errors(f"aborting assembly job {self.job_id!r}"):
            response = self._connection.assembly.AbortJob(
                apb.AbortJobRequest(job_id=self._job()), timeout=self._unary_s
            )
        return job_status(response.job)

    def delete(self) -> None:
        """Deletes the job and everything the server holds for it."""
        process.give_back_leases(self._connection)
        with translate_rpc_errors(f"deleting assembly job {self.job_id!r}"):
            self._connection.assembly.DeleteJob(apb.DeleteJobRequest(job_id=self._job()), timeout=self._unary_s)
        self._ready.clear()

    def close(self) -> None:
        """Waits for outstanding acknowledgements, then closes the prediction stream and the connection (the job
        stays on the server). Idempotent."""
        try:
            self.flush()
        finally:
            self._posting.close()
            if self._transport is not None:
                self._transport.close(idle=not self._posting.unacknowledged)
            process.give_back_leases(self._connection)
        self._connection.close()

    def __enter__(self) -> RemoteSubjectAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
