"""The ``patchwire`` command's parser and dispatch: one subcommand per module of this package (``serve``, ``config``,
``status``, ``top``, ``demo``, ``certs``), each adding its own parser and running its parsed arguments.

Building the parser imports no client code and nothing beyond the standard library for ``config``, ``status``, ``top``,
``demo`` and ``certs``: each imports what it needs when it runs, so a server-only install (no torch) serves, and
``patchwire serve`` never loads the client package.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from patchwire.cli import _logging, certs, config, demo, serve, status, top
from patchwire.cli._logging import FORMATS

__all__ = ["build_parser", "main"]

_COMMANDS = {"serve": serve, "config": config, "status": status, "top": top, "demo": demo, "certs": certs}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``patchwire`` subcommand."""
    parser = argparse.ArgumentParser(prog="patchwire", description="Serve pymia-format HDF5 datasets over gRPC.")
    parser.add_argument(
        "--log-level",
        help="least severe level logged: DEBUG, INFO, WARNING, ERROR (default INFO, or log_level of serve --config)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        help="text: readable lines; json: one JSON object per line with time, level, logger, message and, inside a "
        "server call, its request_id, method, identity and peer (default text, or log_format of serve --config)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``patchwire ARGS`` (``argv``, default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or "INFO", args.log_format or "text")
    return _COMMANDS[args.command].run(args)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Logs records from ``level`` up to stderr, as ``log_format`` (:mod:`patchwire.cli._logging`); called again by
    ``serve`` once its configuration file may have set them (the flags given win there too)."""
    _logging.configure_logging(level, log_format)
