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
    from patchwire.service._settings import Settings

__all__ = ["DEFAULT_CACHE_MB", "UsageError", "add_parser", "run", "server_config", "server_settings"]

_log = logging.getLogger("patchwire")

_MiB = 1 << 20
DEFAULT_CACHE_MB = 1024
"""``ServerConfig.cache_bytes``'s default in MiB (``--cache-mb``): the block cache shared by all datasets and
clients."""


class UsageError(Exception):
    """A configuration that cannot be used (exit status 2): flags, a file or variables, one problem per line."""


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
        return check_replica_id(text)
    except ValueError as exc:  # (argparse names the flag)
        raise argparse.ArgumentTypeError(str(exc).removeprefix("replica_id: ")) from None


def _codecs_arg(text: str) -> tuple[str, ...]:
    from patchwire.wire.compression import offer_from_text

    try:
        return offer_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``serve`` and its flags to the ``patchwire`` command's subparsers. A flag that sets a setting has no
    default of its own (:func:`~patchwire.cli._setting_flags.setting_flag`): ``--help`` shows the dataclass's."""
    from patchwire.cli._limit_flags import add_limit_flags
    from patchwire.cli._setting_flags import DefaultsFromSettings, in_bytes, setting_flag

    serve = sub.add_parser("serve", help="run a server", formatter_class=DefaultsFromSettings)
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of settings (`patchwire config defaults` lists them); the environment (PATCHWIRE_<KEY>) "
        "overrides it, and flags given override both",
    )
    setting_flag(
        serve,
        "--dataset",
        "-d",
        key="datasets",
        action="append",
        type=_dataset_arg,
        metavar="NAME=PATH.h5",
        help="a dataset to serve under NAME (repeat for several; added to the configuration file's)",
    )
    serve.add_argument(
        "--phantom",
        action="store_true",
        help="also serve the built-in phantom dataset as 'phantom' (generated on first use in "
        "$PATCHWIRE_HOME or ~/.cache/patchwire)",
    )
    setting_flag(serve, "--host", key="host", help="interface to bind (0.0.0.0 for all)")
    setting_flag(serve, "--port", key="port", type=int, help="port (0 picks a free one)")
    setting_flag(
        serve,
        "--workers",
        key="workers",
        type=int,
        metavar="N",
        help="serving processes sharing the port (0: one per CPU this process may use, at most 8; 1: a single "
        "process); assembly jobs are served by the first, the others forward those calls to it",
    )
    setting_flag(
        serve,
        "--read-threads",
        key="read_threads",
        type=int,
        metavar="N",
        help="threads per serving process that read and transform samples",
    )
    setting_flag(
        serve, "--grace", key="grace_seconds", type=float, metavar="S", help="seconds running calls get on shutdown"
    )
    setting_flag(
        serve,
        "--state-dir",
        key="state_dir",
        type=Path,
        metavar="DIR",
        help="folder for assembly jobs (journals, partial volumes, results): every prediction batch is journalled "
        "and fsync'ed before it is acknowledged, and restarting with the same folder recovers every job. Default: "
        "jobs in memory (spilled to a temporary folder beyond --assembly-memory, removed at exit; nothing journalled "
        "or synced)",
    )
    setting_flag(
        serve,
        "--assembly-memory",
        key="assembly_memory_bytes",
        unit=_MiB,
        help="most MB of assembly buffers in memory (partial volumes, memory kept for reuse and, without "
        "--state-dir, finished volumes and memory clients still map); the rest are spilled to disk",
    )
    setting_flag(
        serve,
        "--no-shared-memory",
        key="shared_memory",
        action="store_false",
        help="assembly clients on this host always use the wire (default: clients running as this user on this "
        "host post predictions through shared memory and map fetched volumes)",
    )
    setting_flag(
        serve,
        "--shared-memory-uid",
        key="shared_memory_uids",
        type=int,
        action="append",
        metavar="UID",
        help="a user id whose processes may share memory with the server (repeatable; default: the server's own)",
    )
    setting_flag(
        serve,
        "--shared-memory-dir",
        key="shared_memory_dir",
        type=Path,
        metavar="DIR",
        help="where the server makes its private shared-memory socket folder (default: the temporary folder); a "
        "client in a container needs it mounted at the same path",
    )
    setting_flag(
        serve,
        "--cache-mb",
        key="cache_bytes",
        unit=_MiB,
        type=in_bytes(_MiB),
        help="block cache shared by all datasets and clients, in MB (0 disables)",
    )
    setting_flag(
        serve,
        "--packed-cache-mb",
        key="packed_cache_bytes",
        unit=_MiB,
        type=in_bytes(_MiB),
        help="samples of deterministic datasources kept compressed for streams that ask for a blosc2 codec, in MB of "
        "compressed bytes (0 disables): sent again without reading or compressing them",
    )
    setting_flag(
        serve,
        "--verify",
        key="verify",
        action="store_true",
        help="checksum every stored block of every dataset at start (reading each file once) and check each block "
        "read from disk before it is cached or served; a dataset whose block fails is no longer served",
    )
    setting_flag(
        serve,
        "--replica-id",
        key="replica_id",
        type=_replica_id_arg,
        metavar="ID",
        help="this server's stable name among replicas of the same datasets (letters, digits, '_', '-'): the home "
        "named at the start of the assembly job ids it chooses (default: the host name up to its first '.', a "
        "StatefulSet pod's name)",
    )
    setting_flag(
        serve,
        "--metrics-port",
        key="metrics_port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://--metrics-host:PORT/metrics, one endpoint for all --workers (0: a "
        "free port; default: no endpoint)",
    )
    setting_flag(
        serve,
        "--metrics-host",
        key="metrics_host",
        metavar="HOST",
        help="interface of the metrics endpoint (0.0.0.0 for all, e.g. for a Prometheus in another pod)",
    )
    setting_flag(
        serve,
        "--compression",
        key="compressions",
        type=_codecs_arg,
        metavar="NAMES",
        help="codecs clients may ask for, comma-separated (shuffle-lz4, shuffle-zstd, lz4), or 'none'",
    )
    security = serve.add_argument_group("security")
    setting_flag(
        security, "--tls-cert", key="tls_cert", type=Path, metavar="PEM", help="server certificate chain: TLS only"
    )
    setting_flag(security, "--tls-key", key="tls_key", type=Path, metavar="PEM", help="private key of --tls-cert")
    setting_flag(
        security,
        "--tls-client-ca",
        key="tls_client_ca",
        type=Path,
        metavar="PEM",
        help="CA that signs client certificates: every client must present one (mutual TLS)",
    )
    setting_flag(
        security,
        "--auth-config",
        key="auth_config",
        type=Path,
        metavar="FILE",
        help="TOML file of identities (tokens, certificate subjects, roles): every call then needs credentials "
        "(default: no authentication, every caller may do everything)",
    )
    add_limit_flags(serve)


def server_settings(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """The effective settings of parsed ``patchwire`` arguments: the dataclasses' defaults < ``--config`` < the
    environment (``environ``) < the flags given. Every parsed value whose ``dest`` is a setting's key counts as a
    flag given unless it is None, so a flag added with ``dest=KEY`` and no default (or
    :func:`~patchwire.cli._setting_flags.setting_flag`) needs nothing more. ``--phantom`` makes the phantom dataset
    on first use (in ``$PATCHWIRE_HOME`` of ``environ``).

    Raises :class:`UsageError` with every problem (a bad file, variable or flag, values that do not go together)."""
    from patchwire.cli._setting_flags import FLAG_NAMES
    from patchwire.service._settings import ConfigError, load, settings

    known = settings()
    given = {key: value for key, value in vars(args).items() if key in known and value is not None}
    datasets = list(given.pop("datasets", []))
    if args.phantom:
        from patchwire.service._phantom import ensure_phantom_dataset

        datasets.append(("phantom", ensure_phantom_dataset(environ=environ)))
    names = [name for name, _ in datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"dataset name given twice: {', '.join(duplicates)}")
    if datasets:
        given["datasets"] = dict(datasets)
    try:
        return load(args.config, environ, given, FLAG_NAMES)
    except ConfigError as exc:
        raise UsageError("\n".join(exc.problems)) from None


def server_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    """The server's configuration of parsed ``patchwire`` arguments (:func:`server_settings`)."""
    return server_settings(args, environ).config


def run(args: argparse.Namespace) -> int:
    """Runs ``patchwire serve`` until SIGINT or SIGTERM; returns the exit status. One serving process runs here; several
    are forked by a supervisor (:mod:`patchwire.service._workers`) before any event loop or gRPC object exists."""
    import dataclasses

    import uvloop

    from patchwire.cli._main import configure_logging
    from patchwire.service._tls import exposed_without_tls
    from patchwire.service._workers import worker_count

    try:
        settings = server_settings(args)
    except UsageError as exc:
        for problem in str(exc).splitlines():
            print(f"patchwire serve: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.logging.log_level, settings.logging.log_format)
    config = settings.config
    warning = exposed_without_tls(config.host, config.tls_cert is not None)
    if warning is not None:
        print(f"patchwire serve: WARNING: {warning}", file=sys.stderr, flush=True)
    workers = worker_count(config.workers)
    if workers > 1:
        return _supervise(dataclasses.replace(config, workers=workers))
    return uvloop.run(_serve(config))


def _supervise(config: ServerConfig) -> int:
    from patchwire.service._workers import Supervisor, WorkersFailed

    def announce(port: int) -> None:
        print(f"{LISTENING} {config.host}:{port}", flush=True)

    try:
        Supervisor(config).run(announce)
    except (WorkersFailed, OSError) as exc:  # a port in use; a worker's error (no dataset, a certificate...)
        print(f"patchwire serve: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: ServerConfig) -> int:
    from patchwire.service import PatchwireServer, ServiceError
    from patchwire.wire.malloc import tune_malloc

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
