"""The ``patchwire`` command: ``serve`` runs a server; ``status`` shows its assembly jobs' progress; ``demo`` runs
the seed pipeline end to end; ``certs`` writes a self-signed development set of certificates and tokens.

``status`` and ``demo`` live in the client package and are imported only when asked for, so a server-only install
(no torch) serves without them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_log = logging.getLogger("patchwire")


def _dataset_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH.h5, got {text!r}")
    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"dataset {name!r}: no such file {path!r}")
    return name, p


def _credential_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that calls a server: its TLS trust, client certificate and bearer token."""
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchwire", description="Serve pymia-format HDF5 datasets over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server")
    serve.add_argument(
        "--dataset",
        "-d",
        action="append",
        type=_dataset_arg,
        default=[],
        metavar="NAME=PATH.h5",
        help="a dataset to serve under NAME (repeat for several)",
    )
    serve.add_argument(
        "--phantom",
        action="store_true",
        help="also serve the built-in phantom dataset as 'phantom' (generated on first use in "
        "$PATCHWIRE_HOME or ~/.cache/patchwire)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=4, help="sample reading threads (default 4)")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds running calls get on shutdown")
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="folder for assembly jobs (journals, partial volumes, results): every prediction batch is journalled "
        "and fsync'ed before it is acknowledged, and restarting with the same folder recovers every job. Default: "
        "jobs in memory (spilled to a temporary folder beyond --assembly-memory, removed at exit; nothing journalled "
        "or synced)",
    )
    serve.add_argument(
        "--assembly-memory",
        type=float,
        default=1024,
        metavar="MB",
        help="most MB of assembly buffers in memory (partial volumes, memory kept for reuse and, without "
        "--state-dir, finished volumes and memory clients still map); the rest are spilled to disk (default 1024)",
    )
    serve.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_false",
        help="assembly clients on this host always use the wire (default: clients running as this user on this "
        "host post predictions through shared memory and map fetched volumes)",
    )
    serve.add_argument(
        "--shared-memory-uid",
        dest="shared_memory_uids",
        type=int,
        action="append",
        metavar="UID",
        help="a user id whose processes may share memory with the server (repeatable; default: the server's own)",
    )
    serve.add_argument(
        "--shared-memory-dir",
        type=Path,
        metavar="DIR",
        help="where the server makes its private shared-memory socket folder (default: the temporary folder); a "
        "client in a container needs it mounted at the same path",
    )
    serve.add_argument(
        "--cache-mb",
        type=float,
        default=1024,
        metavar="MB",
        help="block cache shared by all datasets and clients, in MB (default 1024; 0 disables)",
    )
    serve.add_argument(
        "--verify",
        action="store_true",
        help="checksum every stored block of every dataset at start (reading each file once) and check each block "
        "read from disk before it is cached or served; a dataset whose block fails is no longer served",
    )
    security = serve.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain: serve TLS only")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="CA that signs client certificates: every client must present one (mutual TLS)",
    )
    security.add_argument(
        "--auth-config",
        type=Path,
        metavar="FILE",
        help="TOML file of identities (tokens, certificate subjects, roles): every call then needs credentials "
        "(default: no authentication, every caller may do everything)",
    )

    from patchwire.service._limits import add_limit_flags

    add_limit_flags(serve)

    status = sub.add_parser("status", help="show the progress of a server's assembly jobs")
    status.add_argument("address", help="the server, HOST:PORT")
    status.add_argument("--job", "-j", help="one job, with a line per subject (default: a table of every job)")
    status.add_argument(
        "--watch", "-w", action="store_true", help="redraw until the job (or every job) is completed or aborted"
    )
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between redraws (default 2)")
    status.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for the server (default 5)"
    )
    _credential_args(status)

    demo = sub.add_parser("demo", help="run the seed pipeline against a server on a built-in phantom dataset")
    demo.add_argument("--address", help="use this running server (HOST:PORT) instead of starting one")
    demo.add_argument("--dataset", default="phantom", help="dataset name on that server (default phantom)")
    demo.add_argument("--batch-size", type=int, default=2)
    demo.add_argument("--workers", type=int, default=0, help="torch DataLoader workers")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _credential_args(demo)

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
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from patchwire.service._errors import ServiceError
    from patchwire.service._limits import limits_from_args
    from patchwire.service._server import PatchwireServer, ServerConfig
    from patchwire.service._tls import exposed_without_tls
    from patchwire.wire.malloc import tune_malloc

    if args.phantom:
        from patchwire.service._phantom import ensure_phantom_dataset

        args.dataset.append(("phantom", ensure_phantom_dataset(environ=os.environ)))
    if not args.dataset:
        print("patchwire serve: give at least one --dataset NAME=PATH.h5 (or --phantom)", file=sys.stderr)
        return 2
    names = [name for name, _ in args.dataset]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        print(f"patchwire serve: dataset name given twice: {', '.join(duplicates)}", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and args.tls_cert is None):
        print("patchwire serve: --tls-cert and --tls-key go together (--tls-client-ca needs them)", file=sys.stderr)
        return 2
    warning = exposed_without_tls(args.host, args.tls_cert is not None)
    if warning is not None:
        print(f"patchwire serve: WARNING: {warning}", file=sys.stderr, flush=True)
    tune_malloc(arena_max=2)
    config = ServerConfig(
        datasets=dict(args.dataset),
        host=args.host,
        port=args.port,
        workers=args.workers,
        grace_seconds=args.grace,
        state_dir=args.state_dir,
        assembly_memory_bytes=int(args.assembly_memory * (1 << 20)),
        cache_bytes=int(args.cache_mb * (1 << 20)),
        shared_memory=args.shared_memory,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_config=args.auth_config,
        limits=limits_from_args(args),
        verify=args.verify,
        shared_memory_uids=None if args.shared_memory_uids is None else tuple(args.shared_memory_uids),
        shared_memory_dir=args.shared_memory_dir,
    )
    server = PatchwireServer(config)
    try:
        await server.start()
    except (ServiceError, RuntimeError, ValueError, OSError) as exc:
        # no dataset that can be served; a port that cannot be bound; an unusable auth config or certificate
        print(f"patchwire serve: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Announced only once the signal handlers are in place: whoever reads this line may stop the server at once.
    print(f"patchwire listening on {args.host}:{server.port}", flush=True)
    await stop.wait()
    _log.info("signal received: stopping (grace %.1fs)", args.grace)
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        import uvloop

        return uvloop.run(_serve(args))
    if args.command == "status":
        from patchwire.client._status import run_status

        return run_status(args)
    if args.command == "demo":
        try:
            from patchwire.client._demo import run_demo
        except ImportError as exc:
            print(
                f"patchwire demo needs the torch client: pip install 'patchwire[server,torch]' ({exc})", file=sys.stderr
            )
            return 2
        return run_demo(args)
    if args.command == "certs":
        return _certs(args)
    return 2


def _certs(args: argparse.Namespace) -> int:
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
