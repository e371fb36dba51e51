"""Client-side assembly: RemoteSubjectAssembler, pymia's SubjectAssembler with the assembly done by the server.

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
exponential backoff and full jitter, for up to ``RetryPolicy.budget_s`` (5 minutes by default; see
:mod:`patchwire.client._retry`). Reads (``status``, ``fetch``, ``events``, ``export``) retry the same way.

On the server's host, predictions and assembled volumes skip the wire: predictions are copied through shared-memory
segments (``shared_memory``, see :mod:`patchwire.wire.shared_memory`), finished volumes are mapped from where the server
holds them (its files, or its memory lent until the arrays on it are gone), and only the small messages that say
where they lie travel over gRPC. Segments are handed to the server over its Unix socket (one connection per process
and server, made anew in a forked child) and registered as regions; the server's files come back over the same
connection. The assembler finds out once, on first use, whether it can register a segment (same host, a socket it
can reach, a user id the server allows, shared memory not turned off on the server) and uses the wire otherwise.

The package, one idea per module: :mod:`~patchwire.client.assembly.assembler` (the facade),
:mod:`~patchwire.client.assembly.posting` (the posting window), :mod:`~patchwire.client.assembly.transports` (how
payloads travel, with :class:`MemoryTransport` for tests), :mod:`~patchwire.client.assembly.status` (job status and
events); the process's segments and socket connections are :mod:`patchwire.client._shared_memory`'s.
"""

from patchwire.client.assembly.assembler import RemoteSubjectAssembler
from patchwire.client.assembly.status import AssemblyEvent, JobStatus, SubjectProgress
from patchwire.client.assembly.transports import MemoryTransport, Transport, TransportStatistics

__all__ = [
    "AssemblyEvent",
    "JobStatus",
    "MemoryTransport",
    "RemoteSubjectAssembler",
    "SubjectProgress",
    "Transport",
    "TransportStatistics",
]
