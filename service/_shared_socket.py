"""The server's shared-memory socket: where same-host clients hand over their segments' descriptors and collect the
server's (see :mod:`patchwire.wire.shared_memory` for the protocol, :mod:`patchwire.service._shared_regions` for the
checks).

The socket lives in a private folder the server makes (``patchwire-shm-*`` under the system's temporary folder, or
under ``parent``), mode 0700 where only the server's own user may share memory (0711, the socket 0777, where other
user ids are allowed: the peer's credentials are checked on every connection); :meth:`stop` removes it. One thread
accepts connections and one thread serves each (at most ``max_connections``; more are refused): nothing here ever
runs on the server's event loop. A connection's regions and uncollected offers are dropped when it closes, as when
the client process dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

from patchwire.service._shared_regions import Connection, Refused, SharedRegions
from patchwire.wire import shared_memory

__all__ = ["SharedMemorySocket"]

_log = logging.getLogger(__name__)
MAX_CONNECTIONS = 256
MAX_PATH_BYTES = 100
"""A Unix socket's path must fit in ``sun_path`` (108 bytes on Linux)."""
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SharedMemorySocket:
    """Serves ``registry`` on a Unix socket; ``start()`` / ``stop()`` (idempotent)."""

    def __init__(
        self, registry: SharedRegions, parent: str | Path | None = None, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.registry = registry
        self._parent = parent
        self._max_connections = max_connections
        self._folder: str | None = None
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}
        self._stopping = False

    @property
    def path(self) -> str:
        return self.registry.socket_path

    def start(self) -> str:
        """Makes the folder and the socket and starts accepting; returns the socket's path."""
        self._folder = tempfile.mkdtemp(prefix="patchwire-shm-", dir=self._parent)
        path = os.path.join(self._folder, "socket")
        if len(os.fsencode(path)) > MAX_PATH_BYTES and self._parent is None:  # a long TMPDIR: /tmp instead
            os.rmdir(self._folder)
            self._folder = tempfile.mkdtemp(prefix="patchwire-shm-", dir="/tmp")
            path = os.path.join(self._folder, "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(path)
            if self.registry.allowed_uids != {os.getuid()}:
                os.chmod(self._folder, 0o711)
                os.chmod(path, 0o777)
            listener.listen(64)
        except BaseException:
            listener.close()
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self._listener = listener
        self.registry.socket_path = path
        self._acceptor = threading.Thread(target=self._accept, name="patchwire-shm-accept", daemon=True)
        self._acceptor.start()
        _log.info("shared memory: clients on this host register segments at %s", path)
        return path

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                if len(self._open) >= self._max_connections:
                    _refuse(conn, f"this server serves at most {self._max_connections} shared-memory connections")
                    continue
                thread = threading.Thread(target=self._serve, args=(conn,), name="patchwire-shm", daemon=True)
                self._open[conn] = thread
                thread.start()

    def _serve(self, conn: socket.socket) -> None:
        connection: Connection | None = None
        try:
            pid, uid, _ = _CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
            try:
                connection = self.registry.connect(uid, pid)
            except Refused as exc:
                _log.warning("shared memory: refused a connection of user id %d", uid)
                _refuse(conn, str(exc))
                return
            conn.sendall(shared_memory.OK)
            while True:
                try:
                    data, fds, flags, _ = socket.recv_fds(conn, shared_memory.MESSAGE_MAX_BYTES, 1)
                except OSError:
                    return
                if not data:
                    return
                reply, out_fd = self._handle(connection, data, fds, flags)
                try:
                    if out_fd is not None:
                        socket.send_fds(conn, [reply], [out_fd])
                    else:
                        conn.sendall(reply)
                except OSError:
                    return
                finally:
                    if out_fd is not None:
                        os.close(out_fd)
        except Exception:
            _log.exception("shared memory: a connection failed")
        finally:
            if connection is not None:
                self.registry.disconnect(connection)
            with self._lock:
                self._open.pop(conn, None)
            conn.close()

    def _handle(self, connection: Connection, data: bytes, fds: list[int], flags: int) -> tuple[bytes, int | None]:
        """The reply to one request (and a descriptor to send with it)."""
        kind, body = data[:1], data[1:]
        try:
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise Refused("the request was too long or carried more than one descriptor")
            if kind == shared_memory.REGISTER:
                if len(fds) != 1:
                    raise Refused("a registration carries exactly one descriptor")
                fd = fds.pop()
                return shared_memory.OK + self.registry.register(connection, body, fd), None
            if kind == shared_memory.UNREGISTER:
                self.registry.unregister(connection, body)
                return shared_memory.OK, None
            if kind == shared_memory.COLLECT:
                return shared_memory.OK, self.registry.collect(connection, body)
            raise Refused("unknown request")
        except Refused as exc:
            return shared_memory.ERROR + str(exc).encode(), None
        finally:
            for fd in fds:  # descriptors nobody asked for
                os.close(fd)

    def stop(self) -> None:
        """Stops accepting, closes every connection (dropping its regions) and removes the folder."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            conns = dict(self._open)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in conns.values():
            thread.join()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self.registry.socket_path = ""


def _refuse(conn: socket.socket, reason: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(shared_memory.ERROR + reason.encode())
    conn.close()
