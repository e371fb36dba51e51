"""Every assembly job of a server: created within the job limits, found, deleted, and reloaded from ``state_dir``
after a restart.

The store takes domain arguments (a job id, the datasource spec, the output entries, an overlap mode, the caller's
identity); reading them from requests, and checking what a request alone decides, is the servicer's part.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from patchwire.service._auth import ANONYMOUS, Identity
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, bounded
from patchwire.service._limits import DiskQuota, Limits, exhausted
from patchwire.service.assembly.job import Job
from patchwire.service.assembly.journal import confined
from patchwire.service.assembly.memory import MemoryPool
from patchwire.service.assembly.persistence import read_metadata, recover
from patchwire.service.assembly.subjects import EntrySpec
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import spec_pb2

__all__ = ["AssemblyStore"]

_log = logging.getLogger(__name__)


class AssemblyStore:
    """Every job of a server, persisted under ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        resolve: Callable[[spec_pb2.DatasourceSpec], CompiledDatasource],
        memory_budget: int,
        durable: bool = True,
        share_volumes: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.limits = limits if limits is not None else Limits()
        self.quota = DiskQuota(self.limits)
        """Bytes the jobs hold in ``state_dir``, charged before they are written."""
        self.durable = durable
        self.resolve = resolve
        self.pool = MemoryPool(memory_budget, share=share_volumes)
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchwire-finish")
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()  # taken first: before any job's lock (and before ``resolve``'s own)
        (state_dir / "jobs").mkdir(parents=True, exist_ok=True)

    def load(self) -> None:
        """Reloads every job found under ``state_dir`` (after a restart)."""
        for meta_path in sorted((self.state_dir / "jobs").glob("*/job.json")):
            try:
                meta = read_metadata(meta_path)
                job = Job(
                    meta.job_id,
                    meta_path.parent,
                    meta.spec,
                    self.resolve(meta.spec),
                    meta.entries,
                    meta.mode,
                    self.pool,
                    meta.created_ms,
                    self.finisher,
                    owner=meta.owner,
                )
                job.quota = self.quota
                job.state = meta.state
                recover(job)
            except Exception:
                _log.exception("could not recover assembly job in %s; its files are kept", meta_path.parent)
                self.quota.drop(str(meta_path.parent.name))
                continue
            self.jobs[job.id] = job
            _log.info(
                "recovered assembly job %s: %d of %d subjects ready",
                job.id,
                sum(s.state == apb.SUBJECT_STATE_READY for s in job.subjects.values()),
                len(job.subjects),
            )

    def create(
        self,
        job_id: str,
        spec: spec_pb2.DatasourceSpec,
        entries: list[EntrySpec],
        mode: str,
        identity: Identity = ANONYMOUS,
    ) -> Job:
        """Creates a job assembling ``entries`` of the samples of ``spec`` (its extractor and transform do not
        count) in overlap ``mode``, owned by ``identity``, within the job limits; the same parameters again return
        the job (to its owner or an administrator: a job id another identity holds is PERMISSION_DENIED, whatever
        the parameters, so that neither the job nor its parameters are revealed)."""
        copied = spec_pb2.DatasourceSpec()
        copied.CopyFrom(spec)
        spec = copied
        spec.ClearField("extractor")
        spec.ClearField("transform")
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is not None:
                if not identity.owns(existing.owner):
                    raise PermissionDenied(f"job_id: {bounded(job_id)} is taken: choose another id")
                if (
                    existing.spec.SerializeToString(deterministic=True) == spec.SerializeToString(deterministic=True)
                    and existing.entries == entries
                    and existing.mode == mode
                ):
                    return existing
                raise FailedPrecondition(f"job_id: job {job_id!r} already exists with other parameters")
            self._admit(identity)
            source = self.resolve(spec)
            if source.sampler is not None:
                raise InvalidArgument(
                    "spec.indexing_strategy.patch_sampling: sampled patches lie at random places, so predictions "
                    "on them cannot be assembled into volumes: assemble with a deterministic indexing strategy"
                )
            if source.length == 0:
                raise InvalidArgument(f"spec: the datasource on {spec.dataset!r} has no samples: nothing to assemble")
            try:
                directory = confined(self.state_dir / "jobs", job_id)
            except ValueError:
                raise InvalidArgument(f"job_id: {bounded(job_id)} does not name a folder of its own") from None
            for sub in ("journals", "buffers", "results"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
            job = Job(
                job_id,
                directory,
                spec,
                source,
                entries,
                mode,
                self.pool,
                int(time.time() * 1000),
                self.finisher,
                self.durable,
                identity.name,
            )
            job.quota = self.quota
            job.save_metadata()
            self.jobs[job_id] = job
        _log.info(
            "created assembly job %s on %r (%d subjects, %d samples, %s) for %s",
            job_id,
            spec.dataset,
            len(job.subjects),
            source.length,
            mode,
            identity.name,
        )
        return job

    def _admit(self, identity: Identity) -> None:
        """Refuses a new job beyond the job limits (under ``_lock``); without authentication (every caller
        ANONYMOUS) only the total applies."""
        lim = self.limits
        owner = identity.name
        owned = sum(1 for job in self.jobs.values() if job.owner == owner)
        if identity is not ANONYMOUS and owned >= lim.max_jobs_per_identity:
            raise exhausted(
                f"jobs: {bounded(owner)} already holds {owned} assembly jobs (delete finished ones)",
                lim.max_jobs_per_identity,
                "--max-jobs-per-identity",
            )
        if len(self.jobs) >= lim.max_jobs:
            raise exhausted(
                f"jobs: the server already holds {len(self.jobs)} assembly jobs", lim.max_jobs, "--max-jobs"
            )

    def close(self) -> None:
        """Waits for the volumes being finished; the store is not used afterwards."""
        self.finisher.shutdown(wait=True)

    def get(self, job_id: str, field: str = "job_id") -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"{field}: unknown assembly job {bounded(job_id)}") from None

    def delete(self, job_id: str) -> None:
        with self._lock:
            job = self.get(job_id)
            del self.jobs[job_id]
        job.delete_files()
        self.quota.drop(job_id)  # its folder is gone: every byte it held is given back
