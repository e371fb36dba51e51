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
retries transparently when the connection drops.
"""

from __future__ import annotations

import collections
import logging
import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchwire.client._connection import Connection
from patchwire.client._datasource import RemoteDatasource
from patchwire.client._decoding import decode_stream
from patchwire.client._errors import ConnectionFailed, translate_rpc_errors
from patchwire.client.conversion import ImageProperties
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import codec, values_pb2

__all__ = ["AssemblyEvent", "JobStatus", "RemoteSubjectAssembler", "SubjectProgress"]

_log = logging.getLogger(__name__)
FETCH_SUBJECT = "/patchwire.v1.AssemblyService/FetchSubject"
PREDICTION_KEY = "__prediction"  # pymia's key for a plain array prediction
_MODES = {
    "overwrite": apb.OVERLAP_MODE_OVERWRITE,
    "average": apb.OVERLAP_MODE_AVERAGE,
    "gaussian": apb.OVERLAP_MODE_GAUSSIAN,
}
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


def _with_chunks(batch: apb.PredictionBatch, payloads: Sequence[memoryview]) -> list[Request]:
    """The batch request, then its tensors' chunk messages as wire bytes (one copy of each payload)."""
    out: list[Request] = [apb.PostPredictionsRequest(batch=batch)]
    out.extend(chunk for p in payloads for chunk in codec.serialized_chunks(p))
    return out


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
    (``flush()``, a last batch and ``close()`` wait for every acknowledgement).
    """

    def __init__(
        self,
        connection: Connection,
        datasource: RemoteDatasource,
        overlap: str = "overwrite",
        dtype: Any = None,
        job_id: str | None = None,
        entries: Mapping[str, int] | None = None,
        retries: int = 3,
        window: int = 1,
    ) -> None:
        if overlap not in _MODES:
            raise ValueError(f"overlap must be one of {', '.join(_MODES)}, got {overlap!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._connection = connection
        self.datasource = datasource
        self.overlap = overlap
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.job_id = job_id
        self.retries = retries
        self._created = False
        self._ready: set[int] = set()
        self._single = False
        self._stream: _PostStream | None = None
        self.window = window
        self._inflight: collections.deque[list[Request]] = collections.deque()
        self._last_ack: apb.PostPredictionsResponse | None = None
        if entries is not None:
            self._create({name: (int(c), self.dtype or np.dtype(np.float32)) for name, c in entries.items()})

    # -- job --------------------------------------------------------------------------------------------------------

    def _create(self, entries: Mapping[str, tuple[int, np.dtype[Any]]]) -> None:
        request = apb.CreateJobRequest(
            spec=self.datasource._spec,
            overlap_mode=_MODES[self.overlap],
            job_id=self.job_id or "",
            entries=[
                apb.OutputEntry(name=name, channels=c, dtype=codec.dtype_to_proto(dt))
                for name, (c, dt) in entries.items()
            ],
        )
        with translate_rpc_errors("creating an assembly job"):
            response = self._connection.assembly.CreateJob(request)
        self.job_id = response.job.job_id
        self._single = list(entries) == [PREDICTION_KEY]
        self._created = True

    def _job(self) -> str:
        if self.job_id is None:
            raise ValueError("the assembly job is created by the first add_batch (or pass entries=...)")
        return self.job_id

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
        payloads: list[memoryview] = []
        for key, arr in arrays.items():
            tensor, payload = codec.array_to_tensor(arr)
            batch.fields.add(key=key, stacked=tensor)
            if payload is not None:
                payloads.append(payload)
        return _with_chunks(batch, payloads)

    def add_samples(
        self, predictions: Mapping[str, Sequence[np.ndarray]], sample_indices: Sequence[int], last_batch: bool = False
    ) -> None:
        """Like add_batch for samples whose predictions differ in shape (e.g. clamped border patches)."""
        if not self._created:
            self._create({k: (int(v[0].shape[-1]), self.dtype or v[0].dtype) for k, v in predictions.items()})
        batch = apb.PredictionBatch(job_id=self._job(), sample_indices=list(sample_indices), last_batch=last_batch)
        payloads: list[memoryview] = []
        for key, values in predictions.items():
            field = batch.fields.add(key=key)
            field.per_sample.SetInParent()
            for v in values:
                arr = _as_numpy(v)
                tensor, payload = codec.array_to_tensor(arr if self.dtype is None else arr.astype(self.dtype))
                field.per_sample.values.append(values_pb2.Value(tensor=tensor))
                if payload is not None:
                    payloads.append(payload)
        self._post(_with_chunks(batch, payloads), last_batch)

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
        """Reads the oldest batch's acknowledgement. A dropped connection is retried by re-sending every
        unacknowledged batch (posting is idempotent); a batch the server rejects raises, and the batches sent after
        it (which the server never read) are sent again first."""
        attempt = 0
        while True:
            try:
                with translate_rpc_errors(f"posting predictions to assembly job {self.job_id!r}"):
                    assert self._stream is not None
                    response = self._stream.next_ack()
                break
            except (ConnectionFailed, StopIteration) as exc:
                self._drop_stream()
                attempt += 1
                if attempt > self.retries:
                    self._inflight.clear()
                    if isinstance(exc, StopIteration):
                        raise ConnectionFailed("the server closed the prediction stream") from None
                    raise
                _log.warning("posting to job %s failed (%s); retrying (%d/%d)", self.job_id, exc, attempt, self.retries)
                time.sleep(min(0.2 * 2**attempt, 5.0))
                self._resend()
            except BaseException:
                self._drop_stream()
                self._inflight.popleft()
                self._resend()
                raise
        self._inflight.popleft()
        self._last_ack = response
        self._ready.update(int(s) for s in response.ready_subjects)

    def _resend(self) -> None:
        if self._inflight:
            self._stream = _PostStream(self._connection)
            for requests in self._inflight:
                self._stream.put(requests)

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
        request = apb.FetchSubjectRequest(job_id=self._job(), subject_index=int(subject_index))
        with translate_rpc_errors(f"fetching subject {subject_index} of assembly job {self.job_id!r}"):
            (decoded,) = list(decode_stream(self._connection.raw_stream(FETCH_SUBJECT)(request)))
        sample = decoded.sample(0)
        properties = sample.pop("properties")
        return sample, properties

    def status(self, max_missing: int = 16) -> JobStatus:
        """Job and per-subject progress: expected, received, missing (the first ``max_missing`` indices), state."""
        request = apb.GetJobStatusRequest(job_id=self._job(), max_missing=max_missing)
        with translate_rpc_errors(f"reading the status of assembly job {self.job_id!r}"):
            response = self._connection.assembly.GetJobStatus(request)
        return job_status(response.job, response.subjects)

    def events(self, from_sequence: int = 1) -> Iterator[AssemblyEvent]:
        """Subject-ready (and job) events from ``from_sequence`` on: past ones first, then live ones until the job
        completes or is aborted. Closing the iterator cancels the stream."""
        request = apb.SubscribeEventsRequest(job_id=self._job(), from_sequence=from_sequence)
        call = self._connection.assembly.SubscribeEvents(request)
        try:
            with translate_rpc_errors(f"following events of assembly job {self.job_id!r}"):
                for response in call:
                    e = response.event
                    yield AssemblyEvent(
                        e.sequence,
                        _enum_name(apb.EventType, e.type, "EVENT_TYPE_"),
                        e.subject_index,
                        e.subject,
                        e.time_unix_ms,
                    )
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
        size = None
        try:
            with (
                translate_rpc_errors(f"exporting subject {subject_index} of assembly job {self.job_id!r}"),
                open(tmp, "wb") as f,
            ):
                for response in self._connection.assembly.ExportSubject(request):
                    if response.WhichOneof("payload") == "file":
                        size = response.file.size
                    else:
                        f.write(response.data)
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
        self._connection.close()

    def __enter__(self) -> RemoteSubjectAssembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
