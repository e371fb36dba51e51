"""The entry point: ``connect(address)`` returns a Client for one patchwire server or several replicas."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from patchwire.client._compression import check_option
from patchwire.client._connection import Connection
from patchwire.client._credentials import Credentials, PathOrBytes
from patchwire.client._datasource import RemoteDatasource
from patchwire.client._errors import translate_rpc_errors
from patchwire.client._replicas import HomeConnection, Replicas, Survey
from patchwire.client._retry import RetryPolicy
from patchwire.client._timeouts import Timeouts
from patchwire.client.assembly import RemoteSubjectAssembler
from patchwire.client.assembly.status import JobStatus, job_status
from patchwire.client.conversion import ImageProperties
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import dataset_service_pb2
from patchwire.v1 import server_service_pb2 as spb
from patchwire.v1.server_service_pb2_grpc import ServerServiceStub
from patchwire.wire import tensors

if TYPE_CHECKING:
    from patchwire.client.extraction import Extractor, IndexingStrategy

__all__ = ["ArrayInfo", "Client", "DatasetInfo", "SubjectInfo", "connect"]


@dataclass(frozen=True)
class ArrayInfo:
    """One stored array of a subject."""

    category: str
    shape: tuple[int, ...]
    dtype: str
    """numpy dtype name, or 'str' for string data."""


@dataclass(frozen=True)
class SubjectInfo:
    index: int
    """Position in file order (pymia's subject index)."""
    name: str
    arrays: tuple[ArrayInfo, ...]
    image_properties: ImageProperties | None


@dataclass(frozen=True)
class DatasetInfo:
    """What a server says about one dataset."""

    name: str
    subjects: tuple[SubjectInfo, ...]
    categories: tuple[str, ...]
    entry_names: dict[str, tuple[str, ...]]
    """Entry (channel) names per category, e.g. {'images': ('T1', 'T2'), 'labels': ('GT',)}."""


class Client:
    """A connection to one patchwire server or to several replicas (see :func:`connect`). Use as a context manager
    or call :meth:`close`."""

    def __init__(
        self,
        address: str | Sequence[str],
        credentials: Credentials | None = None,
        timeouts: Timeouts | None = None,
        compression: str = "auto",
    ) -> None:
        self.compression = check_option(compression)
        """What this client's datasources ask the server to compress with unless they say otherwise (see
        :func:`connect`)."""
        self._connection = Connection(address, credentials, timeouts)
        self.address = self._connection.address
        """The server's address, or the replicas' (``a:1,b:2``, ``dns:///name:port``)."""

    @property
    def timeouts(self) -> Timeouts:
        """Deadlines of this client's calls, and the default of the datasources it makes."""
        return self._connection.timeouts

    def datasets(self) -> list[str]:
        """Names of the datasets the server serves (see :meth:`unavailable_datasets` for those it cannot)."""
        with translate_rpc_errors(f"listing datasets at {self.address}"):
            response = self._connection.datasets.ListDatasets(
                dataset_service_pb2.ListDatasetsRequest(), timeout=self.timeouts.unary_s
            )
        return [d.name for d in response.datasets if not d.unavailable]

    def unavailable_datasets(self) -> dict[str, str]:
        """Datasets the server knows but cannot serve, each with the reason (a file that does not open or is not a
        consistent pymia dataset, one that changed into such a file, a block that failed its checksum)."""
        with translate_rpc_errors(f"listing datasets at {self.address}"):
            response = self._connection.datasets.ListDatasets(
                dataset_service_pb2.ListDatasetsRequest(), timeout=self.timeouts.unary_s
            )
        return {d.name: d.unavailable_reason for d in response.datasets if d.unavailable}

    def describe(self, dataset: str) -> DatasetInfo:
        """Subjects (in file order), categories, entry names, array shapes and dtypes, image properties."""
        with translate_rpc_errors(f"describing dataset {dataset!r} at {self.address}"):
            r = self._connection.datasets.DescribeDataset(
                dataset_service_pb2.DescribeDatasetRequest(dataset=dataset), timeout=self.timeouts.unary_s
            )
        subjects = []
        for s in r.subjects:
            arrays = tuple(
                ArrayInfo(a.category, tuple(a.shape), "str" if a.is_string else str(tensors.dtype_from_proto(a.dtype)))
                for a in s.arrays
            )
            props = None
            if s.HasField("image_properties"):
                props = ImageProperties.from_proto(s.image_properties)
            subjects.append(SubjectInfo(int(s.index), s.name, arrays, props))
        return DatasetInfo(
            r.name,
            tuple(subjects),
            tuple(c.name for c in r.categories),
            {c.name: tuple(c.entry_names) for c in r.categories},
        )

    def datasource(
        self,
        dataset: str,
        indexing_strategy: IndexingStrategy | None = None,
        extractor: Extractor | None = None,
        transform: Any = None,
        subject_subset: Sequence[str] | None = None,
        label_compression: str | None = None,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        shared_memory: bool = True,
        compression: str | None = None,
    ) -> RemoteDatasource:
        """pymia's ``PymiaDatasource(path, indexing_strategy, extractor, transform, subject_subset)``, served.

        ``label_compression='lz4'`` has the server LZ4-compress integer and bool arrays (label maps, masks) where
        that makes them smaller; they arrive decompressed, bit for bit. Worth it where the network, not the CPU, is
        the limit, and for slices on one machine (the README's benchmark: +4-9% for slices, -9% for 64^3 patches);
        None (the default) sends them raw. ``timeouts``: deadlines of its calls (default:
        the client's); ``retry``: how long reads and streams are retried while the server is unreachable or
        restarting (default ``RetryPolicy()``, 5 minutes); a stream resumes where it broke off, on another replica
        where the client has several. ``shared_memory``: on the server's host, the server writes the samples that
        ``ds[i]`` and ``get_samples`` read (the map-style torch adapter's) into this process's shared memory instead
        of sending them through gRPC (where it cannot, they come over the wire; always over the wire from several
        replicas, whose calls may each reach another one); False: always over the wire. ``compression``: "auto",
        "none" or a codec for this datasource's tensors over the wire (default: the client's, see :func:`connect`);
        ``ds.codec`` says which codec it resolved to, ``ds.stats`` the bytes on the wire against those delivered."""
        return RemoteDatasource(
            self._connection.reopened(timeouts),
            dataset,
            indexing_strategy,
            extractor,
            transform,
            subject_subset,
            label_compression,
            retry,
            shared_memory and not self._connection.replicated,
            self.compression if compression is None else compression,
        )

    def assembler(
        self,
        datasource: RemoteDatasource,
        overlap: str = "overwrite",
        dtype: Any = None,
        job_id: str | None = None,
        entries: Mapping[str, int] | None = None,
        window: int = 1,
        shared_memory: bool | None = None,
        retry: RetryPolicy | None = None,
    ) -> RemoteSubjectAssembler:
        """pymia's ``SubjectAssembler(datasource)``, assembling on the server (see RemoteSubjectAssembler; on the
        server's host payloads go through shared memory unless ``shared_memory=False``; ``retry``: how long calls
        are retried while the server is unreachable, default 5 minutes). With several replicas, every call of the job
        goes to its home replica (``job_id``'s ``<replica_id>.`` prefix; a new job's home is chosen among the
        replicas that answer)."""
        return RemoteSubjectAssembler(
            self._connection.reopened(),
            datasource,
            overlap,
            dtype,
            job_id,
            entries,
            window=window,
            shared_memory=shared_memory,
            retry=retry,
        )

    def replicas(self) -> dict[str, str]:
        """Replica id -> address of every server that answers now: each replica's, found by resolving the target and
        asking every address (``GetServerInfo``); the one server's for a single address."""
        if not self._connection.replicated:
            with translate_rpc_errors(f"asking which replica answers at {self.address}"):
                info = ServerServiceStub(self._connection.channel).GetServerInfo(
                    spb.GetServerInfoRequest(), timeout=self.timeouts.unary_s
                )
            return {info.replica_id: self.address}
        return self._replica_directory().survey().answered

    def _replica_directory(self) -> Replicas:
        c = self._connection
        return Replicas.of(c.target, c.credentials, c.timeouts)

    def jobs(self) -> list[JobStatus]:
        """Every assembly job on the server; with several replicas, on every replica that answers now (each job with
        its ``home``), by replica id."""
        if not self._connection.replicated:
            return self._jobs_at(self._connection, self.address, "")
        return self._jobs_of(self._replica_directory().survey())

    def _jobs_of(self, survey: Survey) -> list[JobStatus]:
        """The jobs of every replica that answered ``survey``, by replica id."""
        jobs: list[JobStatus] = []
        for replica_id, address in sorted(survey.answered.items()):
            target = self._connection.target.replica(address)
            connection = Connection(target, self._connection.credentials, self.timeouts)
            try:
                jobs.extend(self._jobs_at(connection, f"replica {replica_id!r} at {address}", replica_id))
            finally:
                connection.close()
        return jobs

    def _jobs_at(self, connection: Connection, where: str, home: str) -> list[JobStatus]:
        with translate_rpc_errors(f"listing assembly jobs at {where}"):
            response = connection.assembly.ListJobs(apb.ListJobsRequest(), timeout=self.timeouts.unary_s)
        return [dataclasses.replace(job_status(j), home=home) for j in response.jobs]

    def job_status(self, job_id: str, max_missing: int = 16) -> JobStatus:
        """Status of an assembly job, with per-subject progress (from its home replica, where there are several)."""
        connection = self._connection
        if connection.replicated:
            connection = HomeConnection(self._replica_directory(), self.timeouts)
            connection.place(job_id)
        try:
            with translate_rpc_errors(f"reading the status of assembly job {job_id!r} at {connection.address}"):
                response = connection.assembly.GetJobStatus(
                    apb.GetJobStatusRequest(job_id=job_id, max_missing=max_missing), timeout=self.timeouts.unary_s
                )
        finally:
            if connection is not self._connection:
                connection.close()
        home = connection.home if isinstance(connection, HomeConnection) else None
        return dataclasses.replace(job_status(response.job, response.subjects), home=home or "")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"


def connect(
    address: str | Sequence[str],
    timeout: float = 10.0,
    *,
    token: str | None = None,
    root_certificates: PathOrBytes | None = None,
    client_certificate: PathOrBytes | None = None,
    client_key: PathOrBytes | None = None,
    tls: bool = False,
    credentials: Credentials | None = None,
    timeouts: Timeouts | None = None,
    wait_for_server: bool = False,
    compression: str = "auto",
) -> Client:
    """Connects to the patchwire server at ``address`` (HOST:PORT), waiting up to ``timeout`` seconds for it.

    Several replicas of the same datasets: a list of HOST:PORT (or one string of them separated by commas), or
    ``dns:///NAME:PORT`` for every address a DNS name resolves to (a Kubernetes headless Service). Calls and streams
    are then spread over the replicas by gRPC's ``round_robin`` (one channel; a stream whose replica dies resumes
    at its cursor on another); assembly jobs go to their home replica (:mod:`patchwire.client._replicas`). Over TLS
    the replicas' certificates must be valid for the DNS name, or for a list for its first host.

    TLS is used when ``root_certificates`` (the CA to trust, a path or PEM bytes) or a client certificate is given,
    or ``tls=True`` (the system's CAs); ``client_certificate`` and ``client_key`` answer a server that requires
    mutual TLS; ``token`` is sent as a bearer token on every call (TLS only). Or pass one ready ``credentials``.
    Datasources, streaming datasets and assemblers made from the client, and DataLoader workers they are pickled
    into, use the same credentials. An unknown token or certificate raises AuthenticationError; a client
    certificate the server does not accept fails the TLS handshake (ConnectionFailed).

    Where nothing listens, ServerUnavailable is raised at once; ``wait_for_server=True`` waits up to ``timeout``
    for a server that is still starting instead. A server that accepts connections but does not answer raises
    DeadlineExceeded after ``timeout``. ``timeouts``: deadlines of every later call and how fast a dead server is
    detected (:class:`Timeouts`).

    ``compression``: how the server should compress the tensors it sends (each datasource may override it).
    ``"auto"`` (the default): a codec the server offers (byte shuffle + LZ4 first) when the server is on another
    host, nothing on loopback, a Unix socket or this host's own addresses, where compressing costs more CPU than the
    bytes it saves, and nothing for samples that shared memory carries. ``"none"``: always raw. A codec name
    (``"shuffle-lz4"``, ``"shuffle-zstd"``, ``"lz4"``): that codec wherever the wire carries the data; a server that
    does not offer it refuses the datasource's reads (InvalidArgumentError naming the codecs it offers)."""
    if credentials is None:
        credentials = Credentials.make(token, root_certificates, client_certificate, client_key, tls)
    elif token or root_certificates or client_certificate or client_key or tls:
        raise ValueError("give either credentials or token/root_certificates/client_certificate/client_key/tls")
    client = Client(address, credentials, timeouts, compression)
    try:
        client._connection.wait_ready(timeout, wait_for_server)
    except BaseException:
        client.close()
        raise
    return client
