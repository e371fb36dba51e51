"""The benchmark's servers, started by :mod:`patchwire.cli.launch`: ``patchwire serve`` on the benchmark file and
the ceiling's server, each with its stderr in a log file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from _plan import DATASET

from patchwire.cli.launch import LISTENING, Launched, launched, serve_command


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


@contextlib.contextmanager
def logged_server(command: Sequence[str], log: Path, banner: str = LISTENING) -> Iterator[Launched]:
    """Starts ``command`` and waits for its ``<banner> HOST:PORT`` line; its stderr goes to ``log``. The process is
    terminated on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err, contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(launched(command, banner, env=child_env(), stderr=err))
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; see {log}") from exc
        yield server


def patchwire_server(
    data: Path, state_dir: Path | None, log: Path, cache_mib: float | None = None, extra: tuple[str, ...] = ()
) -> contextlib.AbstractContextManager[Launched]:
    """``patchwire serve`` of ``data`` (as the benchmark's dataset) on a free port; ``cache_mib`` sets ``--cache-mb``
    (the CLI's MB are MiB); no ``state_dir``: assembly jobs in memory; ``extra``: more arguments (``--verify``)."""
    args = list(extra)
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    if cache_mib is not None:
        args += ["--cache-mb", f"{cache_mib:g}"]
    return logged_server(serve_command({DATASET: data}, *args), log)
