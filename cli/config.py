"""``patchwire config``: the server's settings file, checked and documented without starting a server.

``patchwire config check FILE`` reads FILE with this environment's ``PATCHWIRE_*`` overrides applied, as
``patchwire serve --config FILE`` would (:mod:`patchwire.service._settings`), and prints the effective
configuration as TOML: every setting, defaults included, under its documentation, with where each value that is not
the default came from; secrets redacted. Exit status 0, or 2 with one line per problem (file and key, variable, why).
Files the configuration names (datasets, certificates, an auth file) are checked by ``serve`` when it starts: they
may exist only where the server runs.

``patchwire config defaults`` prints every setting with its default: the reference of the file's format.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``config`` and its actions to the ``patchwire`` command's subparsers."""
    config = sub.add_parser("config", help="check a server settings file, or list every setting")
    actions = config.add_subparsers(dest="config_action", required=True)
    check = actions.add_parser(
        "check",
        help="validate FILE (with the PATCHWIRE_* environment applied) and print the effective configuration",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="TOML settings file (patchwire serve --config FILE)")
    actions.add_parser("defaults", help="print every setting with its default and documentation, as TOML")


def run(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """Runs ``patchwire config ACTION``; returns the exit status."""
    from patchwire.service._settings import ConfigError, defaults, load, render

    if args.config_action == "defaults":
        print(render(defaults(), "patchwire serve settings: every key with its default"), end="")
        return 0
    try:
        effective = load(args.file, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"patchwire config check: {problem}", file=sys.stderr)
        return 2
    print(render(effective, f"patchwire serve settings: {args.file} with the environment applied"), end="")
    return 0
