"""Flags that more than one subcommand takes: the credentials of a command that calls a server."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_credential_flags"]


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that calls a server: its TLS trust, client certificate and bearer token (read by
    ``patchwire.client.Credentials.from_args``)."""
    group = parser.add_argument_group("credentials")
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the bearer token to send (default: the PATCHWIRE_TOKEN environment variable, if set)",
    )
    group.add_argument("--ca-cert", type=Path, metavar="PEM", help="CA to trust for the server's certificate: use TLS")
    group.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs (without --ca-cert)")
    group.add_argument("--client-cert", type=Path, metavar="PEM", help="client certificate for mutual TLS")
    group.add_argument("--client-key", type=Path, metavar="PEM", help="private key of --client-cert")
