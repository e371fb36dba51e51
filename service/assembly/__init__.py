"""Server-side assembly: predictions of indexed samples stitched back into whole-subject volumes, durably.

One idea per module:

- :mod:`.store`: every job of a server (create within the limits, find, delete, reload after a restart);
- :mod:`.job`: one job, posting (validate, charge the quota, journal, apply, finish) and aborting;
- :mod:`.subjects`: one subject's expectations, buffers, buffer and result files, and ``.npy`` I/O;
- :mod:`.memory`: the memory pool (budget, spilling, spare memory, memfds and leases);
- :mod:`.blending`: the weights of overlapping patches;
- :mod:`.journal`: append-only journals of acknowledged predictions, and atomic writes;
- :mod:`.persistence`: job metadata, the event log, and recovery from a job's folder;
- :mod:`.results`: finished volumes served as arrays, files or lent memory;
- :mod:`.export`: finished volumes as NIfTI, MHA or HDF5 files;
- :mod:`.intake`: a PostPredictions stream read into admitted, complete batches;
- :mod:`.protos`: requests read into the store's arguments, jobs built into response messages;
- :mod:`.servicer`: the gRPC face.

Locks, in the only order in which they may be held together (a thread holding one may take only those after it):

1. ``AssemblyStore._lock``: the table of jobs (creating, deleting); a datasource is resolved under it.
2. ``Job.lock`` (reentrant): one job's state, subjects and events. No thread waits for a subject's volume to be
   written (``Subject.finished``) while holding it.
3. ``DiskQuota``'s lock, taken and released inside each charge or refund; ``MemoryPool.lock``: the pool, every
   subject's buffers and the memory under them. Neither is taken while the other is held.
4. ``MemoryPool._memfds_lock`` (reentrant): the count of open memfds, taken under the pool's lock (and by any
   garbage collection that closes a memfd).
"""

from patchwire.service.assembly.job import Job, PostResult
from patchwire.service.assembly.memory import MemoryPool
from patchwire.service.assembly.servicer import AssemblyServicer
from patchwire.service.assembly.store import AssemblyStore
from patchwire.service.assembly.subjects import EntrySpec

__all__ = ["AssemblyServicer", "AssemblyStore", "EntrySpec", "Job", "MemoryPool", "PostResult"]
