"""Replica ids and the homes of assembly jobs: the naming rules both ends share.

Several ``patchwire serve`` replicas may serve the same datasets; each has a replica id (``--replica-id``, by default
the host's short name, which in a Kubernetes StatefulSet is the pod's name: ``patchwire-0``, ``patchwire-1``, ...).
Streams may go to any replica, but an assembly job lives on one, its *home*, named at the start of its id:
``<replica_id>.<rest>`` (``patchwire-1.3f9c0a12b7d4``). A replica that chooses a job's id itself prefixes its own
replica id; a client that names a job may do the same to choose its home. An id without a ``.`` names no home (a
client routes it by hashing the id over the replica ids: :mod:`patchwire.client._replicas`).
"""

from __future__ import annotations

import re
import uuid

__all__ = ["MAX_REPLICA_ID_CHARS", "check_replica_id", "default_replica_id", "job_home", "new_job_id"]

MAX_REPLICA_ID_CHARS = 63
"""A DNS label's length (a StatefulSet pod's name fits): with the 12 characters of a generated suffix a job id stays
far below its 128 characters."""
_REPLICA_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_REPLICA_ID_CHARS - 1}}}")
"""Letters, digits, ``_`` and ``-``, a letter or digit first (job ids begin so), no ``.`` (it ends the home's name in
a job id)."""


def check_replica_id(value: str, field: str = "replica_id") -> str:
    """``value`` if it is a valid replica id; ValueError naming ``field`` and the rule otherwise."""
    if not isinstance(value, str) or not _REPLICA_ID.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}... ({len(value)} chars)"
        raise ValueError(
            f"{field}: {shown!r} is not a replica id: use 1 to {MAX_REPLICA_ID_CHARS} letters, digits, '_' or '-', "
            "beginning with a letter or digit (no '.': it ends the home replica's name in assembly job ids)"
        )
    return value


def default_replica_id(hostname: str) -> str:
    """The replica id a server takes from its host's name: the first label (a pod's name in Kubernetes; ``node1`` of
    ``node1.example.org``), other characters replaced by ``-``, cut to :data:`MAX_REPLICA_ID_CHARS`; ``patchwire``
    where nothing usable is left."""
    label = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".", 1)[0])[:MAX_REPLICA_ID_CHARS].lstrip("_-")
    return label or "patchwire"


def job_home(job_id: str) -> str | None:
    """The replica id a job id names as its home (what precedes its first ``.``), or None where it names none."""
    prefix, dot, _ = job_id.partition(".")
    return prefix if dot and _REPLICA_ID.fullmatch(prefix) else None


def new_job_id(replica_id: str) -> str:
    """A fresh job id whose home is ``replica_id``: ``<replica_id>.`` and 12 random hex digits."""
    return f"{replica_id}.{uuid.uuid4().hex[:12]}"
