"""Who is calling: identities with roles, and the identity of the call being served.

An identity is a name with roles: ``read`` (datasets), ``write`` (assembly jobs of its own) and ``admin`` (every
job). A server without authentication configured serves every caller as :data:`ANONYMOUS`, which holds every role;
jobs it makes belong to that name.

The identity of the call being served is set before its handler runs and read with :func:`current_identity` on the
handler's own task (executor threads do not see it: handlers pass it on explicitly).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["ADMIN", "ANONYMOUS", "READ", "ROLES", "WRITE", "Identity", "current_identity", "serving_as"]

READ = "read"
"""List, describe and stream datasets."""
WRITE = "write"
"""Create assembly jobs, and post to, read, abort and delete the jobs one created."""
ADMIN = "admin"
"""Everything: every job, whoever created it."""
ROLES = (READ, WRITE, ADMIN)


@dataclass(frozen=True)
class Identity:
    """A caller the server knows."""

    name: str
    """How the server names the caller: in logs, and as the owner of the jobs it creates."""
    roles: frozenset[str]
    """A subset of :data:`ROLES`."""

    def has(self, role: str) -> bool:
        return role in self.roles or ADMIN in self.roles

    def owns(self, owner: str) -> bool:
        """Whether this identity may act on what ``owner`` made (its own, or anything for an administrator)."""
        return owner == self.name or ADMIN in self.roles


ANONYMOUS = Identity("anonymous", frozenset(ROLES))
"""Every caller of a server without authentication."""

_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("patchwire_identity", default=ANONYMOUS)


def current_identity() -> Identity:
    """The identity of the call being served (ANONYMOUS outside a call or without authentication)."""
    return _current.get()


def serving_as(identity: Identity) -> contextvars.Token[Identity]:
    """Sets the identity of the call being served (on the call's task); returns the token to reset it."""
    return _current.set(identity)
