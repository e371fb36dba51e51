"""What a client presents to a server: TLS trust, a client certificate for mutual TLS, a bearer token.

:class:`Credentials` holds the PEM bytes and the token themselves (files are read once, when it is made), so a
:class:`~patchwire.client._connection.Connection` pickled into DataLoader workers, even on another machine,
reopens its channel with the same credentials.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from patchwire.client._interceptors import MetadataInterceptor
from patchwire.client._request_ids import RequestIds

__all__ = ["TOKEN_ENV", "Credentials", "PathOrBytes"]

TOKEN_ENV = "PATCHWIRE_TOKEN"
"""Environment variable the ``patchwire`` commands read a bearer token from when no ``--token-file`` is given."""

PathOrBytes = str | os.PathLike[str] | bytes


def _pem(value: PathOrBytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class Credentials:
    """How to reach a server that wants TLS and/or identification. The default (all None, ``tls`` False) is a
    plaintext channel without credentials."""

    token: str | None = None
    """Bearer token, sent as ``authorization: Bearer <token>`` on every call (requires TLS)."""
    root_certificates: bytes | None = None
    """PEM CA certificate(s) to trust for the server's certificate (None with ``tls``: the system's CAs)."""
    client_certificate: bytes | None = None
    """PEM client certificate chain, for a server that requires mutual TLS."""
    client_key: bytes | None = None
    """PEM private key of ``client_certificate``."""
    tls: bool = False
    """Use TLS (implied by any of the certificates)."""

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together")
        if self.token is not None and not self.token.strip():
            raise ValueError("token: empty")
        if self.token is not None and not self.secure:
            raise ValueError(
                "a token needs TLS, or it crosses the network in clear: give root_certificates (or tls=True)"
            )

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None or self.client_certificate is not None

    @classmethod
    def make(
        cls,
        token: str | None = None,
        root_certificates: PathOrBytes | None = None,
        client_certificate: PathOrBytes | None = None,
        client_key: PathOrBytes | None = None,
        tls: bool = False,
    ) -> Credentials:
        """Credentials from paths or PEM bytes (files are read now)."""
        return cls(
            token.strip() if token is not None else None,
            _pem(root_certificates),
            _pem(client_certificate),
            _pem(client_key),
            tls,
        )

    @classmethod
    def from_args(cls, args: Any, environ: Mapping[str, str]) -> Credentials:
        """The credentials of a ``patchwire`` command: ``--token-file`` (else ``$PATCHWIRE_TOKEN``), ``--ca-cert``,
        ``--tls``, ``--client-cert``, ``--client-key``."""
        token = None
        token_file = getattr(args, "token_file", None)
        if token_file is not None:
            token = Path(token_file).read_text().strip()
        elif environ.get(TOKEN_ENV):
            token = environ[TOKEN_ENV].strip()
        return cls.make(
            token,
            getattr(args, "ca_cert", None),
            getattr(args, "client_cert", None),
            getattr(args, "client_key", None),
            tls=bool(getattr(args, "tls", False)),
        )

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A new channel to ``address`` with these credentials; every call on it carries a request id
        (:mod:`patchwire.client._request_ids`)."""
        if not self.secure:
            return grpc.intercept_channel(grpc.insecure_channel(address, options=options), RequestIds())
        credentials = grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_certificate)
        channel = grpc.secure_channel(address, credentials, options=options)
        if self.token is None:
            return grpc.intercept_channel(channel, RequestIds())
        # the token as metadata of each call, added on the calling thread: gRPC's call credentials run a metadata
        # plugin on a thread of their own, which a fork then waited a minute for (and DataLoader workers fork)
        return grpc.intercept_channel(channel, RequestIds(), _BearerToken(self.token))

    def __repr__(self) -> str:  # never the token or the key
        return (
            f"Credentials(token={'***' if self.token else None}, tls={self.secure}, "
            f"client_certificate={self.client_certificate is not None})"
        )


class _BearerToken(MetadataInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata (over TLS only: a secure channel)."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def metadata(self, details: Any) -> list[tuple[str, Any]] | None:
        return [*(details.metadata or ()), self._metadata]
