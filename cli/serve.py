"""``patchwire serve``: runs a server on the datasets given until SIGINT or SIGTERM.

The flags map onto :class:`patchwire.service.ServerConfig` (:func:`server_config`); combinations argparse cannot
check (no dataset, a name given twice, a TLS key without its certificate) exit with status 2 like argparse's own
refusals, a server that cannot start (no dataset that can be served, a port in use, an unusable certificate or auth
config) with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from patchwire.cli.launch import LISTENING, announce_and_wait

if TYPE_CHECKING:
    from patchwire.service import ServerConfig

__all__ = ["DEFAULT_CACHE_MB", "UsageError", "add_parser", "run", "server_config"]

_log = logging.getLogger("patchwire")

DEFAULT_CACHE_MB = 1024
"""``--cache-mb`` when not given: the block cache shared by all datasets and clients, in MiB."""


class UsageError(Exception):
    """Flags that do not go together (exit status 2)."""


def _dataset_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH.h5, got {text!r}")
    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"dataset {name!r}: no such file {path!r}")
    return name, p


def _replica_id_arg(text: str) -> str:
    from patchwire.wire.replicas import check_replica_id

    try:
        return check_replica_id(text, "--replica-id")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``serve`` and its flags to the ``patchwire`` command's subparsers."""
    from patchwire.cli._limit_flags import add_limit_flags

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
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="serving processes sharing the port (default 0: one per CPU this process may use, at most 8; 1: a "
        "single process); assembly jobs are served by the first, the others forward those calls to it",
    )
    serve.add_argument(
        "--read-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads per serving process that read and transform samples (default 4)",
    )
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
        default=DEFAULT_CACHE_MB,
        metavar="MB",
        help=f"block cache shared by all datasets and clients, in MB (default {DEFAULT_CACHE_MB}; 0 disables)",
    )
    serve.add_argument(
        "--verify",
        action="store_true",
        help="checksum every stored block of every dataset at start (reading each file once) and check each block "
        "read from disk before it is cached or served; a dataset whose block fails is no longer served",
    )
    serve.add_argument(
        "--replica-id",
        type=_replica_id_arg,
        metavar="ID",
        help="this server's stable name among replicas of the same datasets (letters, digits, '_', '-'): the home "
        "named at the start of the assembly job ids it chooses (default: the host name up to its first '.', a "
        "StatefulSet pod's name)",
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
    add_limit_flags(serve)


def server_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    """The server's configuration from parsed ``serve`` flags; ``--phantom`` makes the phantom dataset on first use
    (in ``$PATCHWIRE_HOME`` of ``environ``). Raises :class:`UsageError` for flags that do not go together."""
    from patchwire.cli._limit_flags import limits_from_args
    from patchwire.service import ServerConfig

    datasets = list(args.dataset)
    if args.phantom:
        from patchwire.service._phantom import ensure_phantom_dataset

        datasets.append(("phantom", ensure_phantom_dataset(environ=environ)))
    if not datasets:
        raise UsageError("give at least one --dataset NAME=PATH.h5 (or --phantom)")
    names = [name for name, _ in datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"dataset name given twice: {', '.join(duplicates)}")
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and args.tls_cert is None):
        raise UsageError("--tls-cert and --tls-key go together (--tls-client-ca needs them)")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers: 0 (one per CPU) or more processes, got {args.workers}")
    if args.read_threads is not None and args.read_threads < 1:
        raise UsageError(f"--read-threads: at least 1, got {args.read_threads}")
    return ServerConfig(
        datasets=dict(datasets),
        host=args.host,
        port=args.port,
        # flags not given leave the config's defaults
        **{key: getattr(args, key) for key in ("workers", "read_threads") if getattr(args, key) is not None},
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
        **({} if getattr(args, "replica_id", None) is None else {"replica_id": args.replica_id}),
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``patchwire serve`` until SIGINT or SIGTERM; returns the exit status."""
    import uvloop

    return uvloop.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from patchwire.service import PatchwireServer, ServiceError
    from patchwire.service._tls import exposed_without_tls
    from patchwire.wire.malloc import tune_malloc

    try:
        config = server_config(args)
    except UsageError as exc:
        print(f"patchwire serve: {exc}", file=sys.stderr)
        return 2
    warning = exposed_without_tls(config.host, config.tls_cert is not None)
    if warning is not None:
        print(f"patchwire serve: WARNING: {warning}", file=sys.stderr, flush=True)
    tune_malloc(arena_max=2)
    server = PatchwireServer(config)
    try:
        await server.start()
    except (ServiceError, RuntimeError, ValueError, OSError) as exc:
        # no dataset that can be served; a port that cannot be bound; an unusable auth config or certificate
        print(f"patchwire serve: {exc}", file=sys.stderr)
        return 1
    await announce_and_wait(f"{LISTENING} {config.host}:{server.port}")
    _log.info("signal received: stopping (grace %.1fs)", config.grace_seconds)
    await server.stop()
    return 0
