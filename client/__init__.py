"""patchwire's client: pymia-shaped datasources served by a patchwire server, for PyTorch and TensorFlow.

::

    import patchwire.client as pw
    from patchwire.client import extraction as extr, transformation as tfm, definition as defs

    client = pw.connect("127.0.0.1:50051")
    dataset = client.datasource("brains", extr.SliceIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,)),
                                tfm.Permute(permutation=(2, 0, 1), entries=(defs.KEY_IMAGES,)))

pymia's selection strategies and ``select_indices``, evaluated by the server, live in
:mod:`patchwire.client.selection`. Framework adapters live in :mod:`patchwire.client.torch` and
:mod:`patchwire.client.tensorflow`.
"""

from patchwire.client._client import ArrayInfo, Client, DatasetInfo, SubjectInfo, connect
from patchwire.client._credentials import Credentials
from patchwire.client._datasource import RemoteDatasource, SubjectSamples
from patchwire.client._epochs import EpochOptions
from patchwire.client._errors import (
    AuthenticationError,
    ConnectionFailed,
    DeadlineExceeded,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PatchwireError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    RetriesExhausted,
    RpcError,
    ServerError,
    ServerUnavailable,
)
from patchwire.client._retry import RetryPolicy
from patchwire.client._stats import LoaderStats, LoaderStatsSnapshot
from patchwire.client._timeouts import Timeouts
from patchwire.client.assembly import AssemblyEvent, JobStatus, RemoteSubjectAssembler, SubjectProgress

__all__ = [
    "ArrayInfo",
    "AssemblyEvent",
    "AuthenticationError",
    "Client",
    "ConnectionFailed",
    "Credentials",
    "DatasetInfo",
    "DeadlineExceeded",
    "EpochOptions",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "JobStatus",
    "LoaderStats",
    "LoaderStatsSnapshot",
    "NotFoundError",
    "OutOfRangeError",
    "PatchwireError",
    "PermissionDeniedError",
    "ProtocolError",
    "RemoteDatasource",
    "RemoteSubjectAssembler",
    "ResourceExhaustedError",
    "RetriesExhausted",
    "RetryPolicy",
    "RpcError",
    "ServerError",
    "ServerUnavailable",
    "SubjectInfo",
    "SubjectProgress",
    "SubjectSamples",
    "Timeouts",
    "connect",
]
