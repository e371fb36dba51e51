"""``patchwire status ADDRESS... [--job J] [--watch] [--interval S]``: progress of a server's assembly jobs.

Without ``--job``, one line per job::

    JOB     DATASET  STATE   OVERLAP  KEPT     SUBJECTS  SAMPLES  PROGRESS
    brains  brains   active  average  journal  1/4       412/724  [###########---------]  56%

KEPT is ``journal`` for a job whose acknowledged predictions are on disk (it survives a server restart) and
``memory`` for one that ends with the server (a server without a state folder).

Several replicas (``patchwire status a:50051 b:50051``, ``a:50051,b:50051`` or ``dns:///NAME:PORT``): the jobs of
every replica that answers, with a HOME column (the replica that holds the job), and a last line that names the
replicas and those that did not answer. ``--job`` reads the job's status from its home replica.

With ``--job``, the job's line and one line per subject (progress bar, received/expected, state, missing count).
``--watch`` redraws every ``--interval`` seconds until the job (or every job) is completed or aborted, or Ctrl-C;
when stdout is not a terminal it prints successive snapshots instead of redrawing. Bars are plain text, so the
output reads the same in a terminal, a log file or a pipe.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from patchwire.cli._flags import add_credential_flags
from patchwire.cli._interrupt import Interrupt

if TYPE_CHECKING:
    from patchwire.client import Client, JobStatus, SubjectProgress
    from patchwire.client._replicas import Survey

__all__ = ["add_parser", "format_job", "format_jobs", "run", "run_status"]

BAR_WIDTH = 20
_CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen
_FINISHED = ("completed", "aborted")


def _bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#####---------------]  25%``; the percentage is rounded down, so 100% means everything arrived."""
    fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
    filled = int(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {int(fraction * 100):3d}%"


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _job_row(job: JobStatus, homes: bool = False) -> list[str]:
    return [
        job.job_id,
        *([job.home] if homes else []),
        job.dataset,
        job.state,
        job.overlap,
        _kept(job),
        f"{job.ready_subject_count}/{job.subject_count}",
        f"{job.received}/{job.expected}",
        _bar(job.received, job.expected),
    ]


def _kept(job: JobStatus) -> str:
    return "journal" if job.journalled else "memory"


def format_jobs(jobs: Sequence[JobStatus], address: str, survey: Survey | None = None) -> str:
    """The table of every job on the server at ``address``; with the ``survey`` of several replicas, of every
    replica that answered (a HOME column), and a line naming them and those that did not answer."""
    header = ["JOB", *(["HOME"] if survey is not None else []), "DATASET", "STATE", "OVERLAP", "KEPT", "SUBJECTS"]
    rows = [[*header, "SAMPLES", "PROGRESS"], *(_job_row(j, survey is not None) for j in jobs)]
    lines = _table(rows) if jobs else [f"no assembly jobs on {address}"]
    if survey is not None:
        answered = ", ".join(f"{r} at {a}" for r, a in survey.answered.items())
        unanswered = "; ".join(f"{a} ({reason})" for a, reason in survey.unanswered.items())
        lines.append(f"replicas: {answered or 'none'}" + (f"; no answer from {unanswered}" if unanswered else ""))
    return "\n".join(lines)


def _subject_row(s: SubjectProgress) -> list[str]:
    return [
        str(s.subject_index),
        s.subject,
        _bar(s.received, s.expected),
        f"{s.received}/{s.expected}",
        s.state + (" (forced)" if s.forced else ""),
        str(s.missing),
    ]


def format_job(job: JobStatus) -> str:
    """One job's line, then one line per subject."""
    head = (
        f"job {job.job_id} on {job.dataset}{f' (home {job.home})' if job.home else ''}: {job.state}, "
        f"overlap {job.overlap}, "
        f"{'journalled' if job.journalled else 'in memory'}, "
        f"{job.ready_subject_count}/{job.subject_count} subjects ready, {job.received}/{job.expected} samples  "
        f"{_bar(job.received, job.expected)}"
    )
    header = ["#", "SUBJECT", "PROGRESS", "SAMPLES", "STATE", "MISSING"]
    return "\n".join([head, *_table([header, *(_subject_row(s) for s in job.subjects)], indent="  ")])


def _snapshot(client: Client, job_id: str | None) -> tuple[str, bool]:
    """The text to show and whether watching is over (the job, or every job, is completed or aborted)."""
    if job_id is not None:
        job = client.job_status(job_id, max_missing=0)
        return format_job(job), job.state in _FINISHED
    if not client._connection.replicated:
        jobs = client.jobs()
        return format_jobs(jobs, client.address), all(j.state in _FINISHED for j in jobs)
    survey = client._replica_directory().survey()
    if not survey.answered:
        from patchwire.client import ServerUnavailable

        reasons = "; ".join(f"{a}: {r}" for a, r in survey.unanswered.items())
        raise ServerUnavailable(f"no replica answered at {client.address} ({reasons})")
    jobs = client._jobs_of(survey)
    return format_jobs(jobs, client.address, survey), all(j.state in _FINISHED for j in jobs)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``status`` and its flags to the ``patchwire`` command's subparsers."""
    status = sub.add_parser("status", help="show the progress of a server's (or its replicas') assembly jobs")
    status.add_argument(
        "address",
        nargs="+",
        metavar="ADDRESS",
        help="the server, HOST:PORT; several replicas: more addresses (or HOST:PORT,HOST:PORT), or dns:///NAME:PORT",
    )
    status.add_argument("--job", "-j", help="one job, with a line per subject (default: a table of every job)")
    status.add_argument(
        "--watch", "-w", action="store_true", help="redraw until the job (or every job) is completed or aborted"
    )
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between redraws (default 2)")
    status.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for the server (default 5)"
    )
    add_credential_flags(status)


def run(args: argparse.Namespace) -> int:
    """Runs ``patchwire status`` on this process's stdout and stderr."""
    return run_status(args)


def run_status(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs ``patchwire status``; returns the exit status (0, 1 on an error, 2 for a bad flag, 130 on Ctrl-C)."""
    from patchwire.client import Credentials, PatchwireError, connect
    from patchwire.client._replicas import parse_target

    out = out or sys.stdout
    err = err or sys.stderr
    if args.interval <= 0:
        print(f"patchwire status: --interval must be positive, got {args.interval:g}", file=err)
        return 2
    try:
        credentials = Credentials.from_args(args, os.environ)
    except (OSError, ValueError) as exc:
        print(f"patchwire status: credentials: {exc}", file=err)
        return 2
    try:
        target = parse_target(",".join(args.address))
    except ValueError as exc:
        print(f"patchwire status: {exc}", file=err)
        return 2
    redraw = args.watch and out.isatty()
    try:
        with Interrupt() as stop, connect(str(target), timeout=args.timeout, credentials=credentials) as client:
            first = True
            while True:
                text, finished = _snapshot(client, args.job)
                if redraw:
                    out.write(_CLEAR)
                elif not first:
                    out.write("\n")
                out.write(text + "\n")
                out.flush()
                first = False
                if not args.watch or finished:
                    return 0
                if stop.wait(args.interval):
                    return 130
    except PatchwireError as exc:
        print(f"patchwire status: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
