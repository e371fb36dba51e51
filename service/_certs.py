"""``patchwire certs DIR``: a self-signed development set of TLS certificates and an example auth config.

Writes, in ``DIR``::

    ca.crt                 the development CA (clients trust it: --ca-cert / root_certificates)
    ca.key                 its key (0600): keep it, or delete it once the set is made
    server.crt server.key  for localhost, 127.0.0.1, ::1 and every --host given (--tls-cert / --tls-key)
    client.crt client.key  a client certificate, subject CN=patchwire-client (--client-cert / --client-key)
    auth.toml              identities reader (read), writer (read, write), admin (admin); patchwire-client's
                           certificate is the writer (subjects), each token stored as its SHA-256 digest
    reader.token writer.token admin.token   each identity's fresh random token (0600)

For development and tests only: a production CA and tokens come from the operator's own secret management.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from patchwire.service._auth import token_digest

__all__ = ["CLIENT_SUBJECT", "DevCerts", "make_dev_certs"]

CLIENT_SUBJECT = "CN=patchwire-client"
"""Subject of the client certificate, as ``auth.toml`` maps it."""
_IDENTITIES = (("reader", ("read",)), ("writer", ("read", "write")), ("admin", ("admin",)))
_VALID_DAYS = 365


@dataclass(frozen=True)
class DevCerts:
    """The files :func:`make_dev_certs` wrote."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    auth_config: Path
    tokens: dict[str, str]
    """Identity name -> its token (also in ``<name>.token``)."""


def _write(path: Path, data: bytes, secret: bool = False) -> Path:
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT
    return path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    usage: x509.ObjectIdentifier | None,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_dev_certs(directory: Path, hosts: Sequence[str] = (), now: datetime.datetime | None = None) -> DevCerts:
    """Writes the development set (see the module docstring) into ``directory`` (made if missing); files already
    there are replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _certificate("patchwire development CA", ca_key, None, ca_key, now, None)
    server = _certificate(
        "localhost", server_key, ca.subject, ca_key, now, ExtendedKeyUsageOID.SERVER_AUTH, ["localhost", *hosts]
    )
    client = _certificate(
        CLIENT_SUBJECT.removeprefix("CN="), client_key, ca.subject, ca_key, now, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    pem = serialization.Encoding.PEM
    ca_path = _write(directory / "ca.crt", ca.public_bytes(pem))
    _write(directory / "ca.key", _pem_key(ca_key), secret=True)
    server_cert = _write(directory / "server.crt", server.public_bytes(pem))
    server_key_path = _write(directory / "server.key", _pem_key(server_key), secret=True)
    client_cert = _write(directory / "client.crt", client.public_bytes(pem))
    client_key_path = _write(directory / "client.key", _pem_key(client_key), secret=True)
    tokens = {name: secrets.token_urlsafe(32) for name, _ in _IDENTITIES}
    lines = [
        "# patchwire identities (development set made by `patchwire certs`).",
        "# Tokens are stored as SHA-256 digests; the tokens themselves are in <name>.token.",
        '# Make a digest of your own token with: printf %s "$TOKEN" | sha256sum',
    ]
    for name, roles in _IDENTITIES:
        _write(directory / f"{name}.token", tokens[name].encode() + b"\n", secret=True)
        lines += [
            "",
            "[[identity]]",
            f'name = "{name}"',
            "roles = [" + ", ".join(f'"{r}"' for r in roles) + "]",
            f'token_sha256 = ["{token_digest(tokens[name]).hex()}"]',
        ]
        if name == "writer":
            lines.append(f'subjects = ["{CLIENT_SUBJECT}"]  # the client certificate client.crt')
    auth = _write(directory / "auth.toml", ("\n".join(lines) + "\n").encode())
    return DevCerts(directory, ca_path, server_cert, server_key_path, client_cert, client_key_path, auth, tokens)
