"""TLS for the server: credentials from PEM files, and the warning for a server reachable off this host in clear."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

__all__ = ["exposed_without_tls", "is_loopback", "server_credentials"]

_log = logging.getLogger(__name__)


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None, read: Callable[[Path], bytes] = Path.read_bytes
) -> grpc.ServerCredentials:
    """TLS with the certificate chain ``cert`` and its private ``key``; with ``client_ca`` every client must present
    a certificate that CA signed (mutual TLS)."""
    ca = read(client_ca) if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(read(key), read(cert))], root_certificates=ca, require_client_auth=ca is not None
    )


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine: ``localhost`` or a loopback address (127.0.0.0/8,
    ::1). Anything else, including 0.0.0.0, ``::`` and host names, may be reachable from the network."""
    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposed_without_tls(host: str, tls: bool) -> str | None:
    """The warning for serving ``host`` without TLS where others can reach it, or None when there is none to give.
    Logged at WARNING by the server (the command also prints it)."""
    if tls or is_loopback(host):
        return None
    return (
        f"serving {host} without TLS: anyone who reaches the port reads the datasets and the traffic in clear "
        "(tokens included); give --tls-cert and --tls-key"
    )
