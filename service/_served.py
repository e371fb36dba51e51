"""A dataset as the server serves it: the current version of its file, or the reason it cannot be served.

A :class:`ServedDataset` opens its file when the server starts. A file that does not open or fails the checks of
pymia's layout (:func:`patchwire.service._integrity.validate_layout`) leaves the dataset *unavailable*: an ERROR
log line names it and says why, the catalog lists it with that reason, its health status is NOT_SERVING, and every
call naming it gets FAILED_PRECONDITION with the reason. The other datasets are served as usual.

Every call and every message built from a dataset looks at its file first (:meth:`ServedDataset.current`,
:meth:`ServedDataset.confirm`: one ``os.stat``). When size, modification time, inode or device changed, the open
version is retired (its h5py handles closed, its cached blocks dropped, the compiled datasources bound to it
forgotten) and the file is opened and checked again as a new version: new calls get the new contents, and a call
that was reading the old version ends with FAILED_PRECONDITION ("changed on disk during this call") instead of
sending a message built from either file. A file that no longer passes the checks makes the dataset unavailable;
it becomes available again once its file changes into one that does. In verification mode a block that fails its
checksum makes the dataset unavailable the same way (until its file changes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from patchwire.service._cache import BlockCache
from patchwire.service._catalog import Dataset
from patchwire.service._errors import FailedPrecondition
from patchwire.service._integrity import FileIdentity

__all__ = ["ServedDataset"]

_log = logging.getLogger(__name__)


class ServedDataset:
    """One dataset name and its file: the open version, or why there is none (see the module doc)."""

    def __init__(self, name: str, path: str | Path, cache: BlockCache | None = None, verify: bool = False) -> None:
        self.name = name
        self.path = Path(path)
        self._path_str = str(self.path)  # os.stat of a str skips os.fspath
        self.verify = verify
        self._cache = cache
        self._lock = threading.RLock()
        self._state: tuple[FileIdentity | None, Dataset | None] = (None, None)
        """(the file as it was when it was opened or found unusable, the open version or None), replaced as one:
        a thread that sees the new identity never sees the old version."""
        self._generation = 0
        self.reason: str | None = None
        """Why the dataset is not served (None while it is), for the server's log and its operator."""
        self.listeners: list[Callable[[ServedDataset, Dataset | None], None]] = []
        """Called (on the thread that noticed) after a version is retired or the dataset's availability changes, with
        the retired version (or None)."""
        with self._lock:
            self._open()

    @property
    def available(self) -> bool:
        return self._state[1] is not None

    @property
    def public_reason(self) -> str | None:
        """``reason`` as clients see it (statuses, the catalog): the file named by its base name only, so a
        client learns nothing of the server's folders."""
        if self.reason is None:
            return None
        return self.reason.replace(str(self.path.parent) + os.sep, "").replace(str(self.path), self.path.name)

    def _open(self) -> None:
        """Opens the file as a new version, or records why it cannot be served (under ``_lock``)."""
        self._generation += 1
        try:
            before = FileIdentity.of(self.path)
        except OSError as exc:
            self._unavailable(None, f"cannot open {self.path}: {exc.strerror or exc}")
            return
        try:
            version = Dataset(
                self.name,
                self.path,
                self._cache,
                generation=self._generation,
                verify=self.verify,
                on_corrupt=self._corrupt,
            )
        except Exception as exc:
            self._unavailable(before, str(exc).removeprefix(f"dataset {self.name!r}: "))
            return
        try:
            after = FileIdentity.of(self.path)
        except OSError:
            after = None
        if after != before:  # written while it was being opened: what was read may be of either file
            version.close()
            self._unavailable(after, f"{self.path} changed while it was being opened")
            return
        self.reason = None
        self._state = (before, version)

    def _unavailable(self, identity: FileIdentity | None, reason: str) -> None:
        self.reason = reason
        self._state = (identity, None)
        _log.error("dataset %r is not served: %s", self.name, reason)

    def _look(self) -> Dataset | None:
        """Compares the file with the identity it was opened (or failed) with; on a change, opens it again."""
        try:
            now: FileIdentity | None = FileIdentity.of(self._path_str)
        except OSError:
            now = None
        identity, version = self._state
        if now == identity:
            return version
        with self._lock:
            identity, old = self._state
            if now == identity:  # handled by another thread meanwhile
                return old
            changes = identity.changes(now) if identity and now else "the file is gone or reappeared"
            _log.warning("dataset %r: %s changed on disk (%s): opening it again", self.name, self.path, changes)
            if old is not None:
                old.close()
            self._open()
            version = self._state[1]
            if version is not None:
                _log.info("dataset %r: serving the new contents of %s", self.name, self.path)
        self._notify(old)
        return version

    def current(self) -> Dataset:
        """The version to serve a new call from, after a look at the file; FailedPrecondition if there is none."""
        version = self._look()
        if version is None:
            raise FailedPrecondition(f"dataset {self.name!r} is unavailable: {self.public_reason}")
        return version

    def confirm(self, version: Dataset) -> None:
        """Raises FailedPrecondition unless ``version`` is still what the file holds: called before and after
        building a message, so a change during a read never reaches the client."""
        if self._look() is not version:
            if self._state[1] is None:
                raise FailedPrecondition(f"dataset {self.name!r} is unavailable: {self.public_reason}")
            raise FailedPrecondition(
                f"dataset {self.name!r} changed on disk during this call: it now serves the file's new contents; "
                "open the datasource again"
            )

    def refresh(self) -> None:
        """Looks at the file (for the catalog): a change is picked up, nothing is raised."""
        self._look()

    def _corrupt(self, version: Dataset, reason: str) -> None:
        """A block of ``version`` failed its checksum: stop serving the dataset until its file changes."""
        with self._lock:
            identity, current = self._state
            if current is not version:
                return
            version.close()
            self._unavailable(identity, reason.removeprefix(f"dataset {self.name!r}: "))
        self._notify(version)

    def _notify(self, retired: Dataset | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(self, retired)
            except Exception:  # a listener's failure must not stop the serving of data
                _log.exception("dataset %r: a listener failed", self.name)

    def close(self) -> None:
        with self._lock:
            identity, version = self._state
            if version is not None:
                version.close()
            self.reason = "the server stopped"
            self._state = (identity, None)
