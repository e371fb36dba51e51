"""``patchwire status ADDRESS [--job J] [--watch] [--interval S]``: progress of a server's assembly jobs.

Without ``--job``, one line per job::

    JOB     DATASET  STATE   OVERLAP  KEPT     SUBJECTS  SAMPLES  PROGRESS
    brains  brains   active  average  journal  1/4       412/724  [###########---------]  56%

KEPT is ``journal`` for a job whose acknowledged predictions are on disk (it survives a server restart) and
``memory`` for one that ends with the server (a server without a state folder).

With ``--job``, the job's line and one line per subject (progress bar, received/expected, state, missing count).
``--watch`` redraws every ``--interval`` seconds until the job (or every job) is completed or aborted, or Ctrl-C;
when stdout is not a terminal it prints successive snapshots instead of redrawing. Bars are plain text, so the
output reads the same in a terminal, a log file or a pipe.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from patchwire.client._client import Client, connect
from patchwire.client._credentials import Credentials
from patchwire.client._errors import PatchwireError
from patchwire.client.assembly.status import JobStatus, SubjectProgress

__all__ = ["format_job", "format_jobs", "run_status"]

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


def _job_row(job: JobStatus) -> list[str]:
    return [
        job.job_id,
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


def format_jobs(jobs: Sequence[JobStatus], address: str) -> str:
    """The table of every job on the server at ``address``."""
    if not jobs:
        return f"no assembly jobs on {address}"
    header = ["JOB", "DATASET", "STATE", "OVERLAP", "KEPT", "SUBJECTS", "SAMPLES", "PROGRESS"]
    return "\n".join(_table([header, *(_job_row(j) for j in jobs)]))


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
        f"job {job.job_id} on {job.dataset}: {job.state}, overlap {job.overlap}, "
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
    jobs = client.jobs()
    return format_jobs(jobs, client.address), all(j.state in _FINISHED for j in jobs)


def run_status(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs ``patchwire status``; returns the exit status (0, 1 on an error, 130 on Ctrl-C)."""
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
    redraw = args.watch and out.isatty()
    try:
        with connect(args.address, timeout=args.timeout, credentials=credentials) as client:
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
                time.sleep(args.interval)
    except PatchwireError as exc:
        print(f"patchwire status: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
