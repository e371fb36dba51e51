"""``patchwire certs DIR [--host NAME]``: writes a self-signed development CA, server and client certificates, an
auth config and tokens (made by :func:`patchwire.service._certs.make_dev_certs`), then prints how to use them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``certs`` and its arguments to the ``patchwire`` command's subparsers."""
    certs = sub.add_parser(
        "certs",
        help="write a self-signed development CA, server and client certificates, and an auth config with tokens",
    )
    certs.add_argument("directory", type=Path, help="folder to write them to (made if missing)")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name or address the server certificate is valid for (repeat; localhost, 127.0.0.1 and ::1 "
        "always are)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``patchwire certs``; returns the exit status (1 when the folder cannot be written)."""
    try:
        from patchwire.service._certs import make_dev_certs
    except ImportError as exc:
        print(f"patchwire certs needs the server extra: pip install 'patchwire[server]' ({exc})", file=sys.stderr)
        return 2
    try:
        made = make_dev_certs(args.directory, args.host)
    except OSError as exc:
        print(f"patchwire certs: {exc}", file=sys.stderr)
        return 1
    d = made.directory
    print(f"wrote a development CA, server and client certificates, auth.toml and tokens to {d}")
    print(
        f"  serve:  patchwire serve --tls-cert {d / 'server.crt'} --tls-key {d / 'server.key'} "
        f"--auth-config {d / 'auth.toml'} [--tls-client-ca {d / 'ca.crt'}] ..."
    )
    print(f"  status: patchwire status HOST:PORT --ca-cert {d / 'ca.crt'} --token-file {d / 'admin.token'}")
    return 0
