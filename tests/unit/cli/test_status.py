"""``patchwire status`` without a server: its arguments, the refusals made before connecting, and the text it prints
for hand-made job states."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from patchwire.cli import build_parser
from patchwire.cli.status import format_job, format_jobs, run_status
from patchwire.client import JobStatus, SubjectProgress
from patchwire.client._replicas import Survey


def test_defaults() -> None:
    args = build_parser().parse_args(["status", "h:1"])
    assert (args.address, args.job, args.watch, args.interval, args.timeout) == (["h:1"], None, False, 2.0, 5.0)
    assert (args.token_file, args.ca_cert, args.tls, args.client_cert, args.client_key) == (
        None,
        None,
        False,
        None,
        None,
    )


def test_flags() -> None:
    args = build_parser().parse_args(
        ["status", "h:1", "-j", "J", "-w", "--interval", "0.5", "--timeout", "3", "--tls", "--token-file", "t",
         "--ca-cert", "ca.pem", "--client-cert", "c.pem", "--client-key", "k.pem"]
    )  # fmt: skip
    assert (args.job, args.watch, args.interval, args.timeout, args.tls) == ("J", True, 0.5, 3.0, True)
    assert (args.token_file, args.ca_cert) == (Path("t"), Path("ca.pem"))
    assert (args.client_cert, args.client_key) == (Path("c.pem"), Path("k.pem"))


@pytest.mark.parametrize(("args", "message"), [((), "the following arguments are required: ADDRESS"),
                                               (("h:1", "--interval", "x"), "invalid float value: 'x'")])  # fmt: skip
def test_invalid_arguments_exit_2(args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["status", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("interval", ["0", "-1"])
def test_interval_must_be_positive(interval: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["status", "h:1", "--watch", "--interval", interval])
    assert run_status(args, out, err) == 2
    assert err.getvalue() == f"patchwire status: --interval must be positive, got {float(interval):g}\n"
    assert out.getvalue() == ""


def test_unreadable_token_file_is_refused_before_connecting(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["status", "h:1", "--tls", "--token-file", str(tmp_path / "missing")])
    assert run_status(args, out, err) == 2
    assert err.getvalue().startswith("patchwire status: credentials: ")
    assert out.getvalue() == ""


def _job(**changes: object) -> JobStatus:
    fields: dict[str, object] = dict(
        job_id="brains", dataset="vary", state="active", overlap="gaussian", expected=40, received=10,
        subject_count=2, ready_subject_count=0, last_event_sequence=1, resident_buffer_bytes=0, journalled=True,
    )  # fmt: skip
    return JobStatus(**(fields | changes))  # type: ignore[arg-type]


def test_table_of_jobs() -> None:
    assert format_jobs([], "h:1") == "no assembly jobs on h:1"
    header, first, second = format_jobs([_job(), _job(job_id="b", journalled=False, received=60)], "h:1").splitlines()
    assert header.split() == ["JOB", "DATASET", "STATE", "OVERLAP", "KEPT", "SUBJECTS", "SAMPLES", "PROGRESS"]
    assert " ".join(first.split()) == "brains vary active gaussian journal 0/2 10/40 [#####---------------] 25%"
    assert second.split()[4] == "memory" and second.endswith("[####################] 100%")
    assert header.index("PROGRESS") == first.index("[") == second.index("[")


def test_one_job_with_its_subjects() -> None:
    subjects = (
        SubjectProgress(0, "A", 10, 10, 0, "ready", False, ()),
        SubjectProgress(1, "B", 10, 5, 5, "in_progress", False, ()),
        SubjectProgress(2, "C", 4, 1, 3, "ready", True, ()),
    )
    job = _job(expected=24, received=16, subject_count=3, ready_subject_count=2, subjects=subjects)
    head, header, *rows = format_job(job).splitlines()
    assert head == (
        "job brains on vary: active, overlap gaussian, journalled, 2/3 subjects ready, 16/24 samples  "
        "[#############-------]  66%"
    )
    assert header.split() == ["#", "SUBJECT", "PROGRESS", "SAMPLES", "STATE", "MISSING"]
    assert "\n".join(" ".join(row.split()) for row in rows) == (
        "0 A [####################] 100% 10/10 ready 0\n"
        "1 B [##########----------] 50% 5/10 in_progress 5\n"
        "2 C [#####---------------] 25% 1/4 ready (forced) 3"
    )
    assert all(row.startswith("  ") for row in [header, *rows])
    assert "in memory" in format_job(_job(journalled=False))


def test_several_replicas_are_one_target() -> None:
    assert build_parser().parse_args(["status", "a:1", "b:2", "-j", "J"]).address == ["a:1", "b:2"]
    assert build_parser().parse_args(["status", "dns:///pw.ns.svc:50051"]).address == ["dns:///pw.ns.svc:50051"]


@pytest.mark.parametrize(
    ("addresses", "message"), [(["a:1", "a:1"], "a replica is given twice"), (["dns:///x"], "expected HOST:PORT")]
)
def test_a_target_that_cannot_be_used_is_refused_before_connecting(addresses: list[str], message: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_status(build_parser().parse_args(["status", *addresses]), out, err) == 2
    assert err.getvalue().startswith("patchwire status: target: ") and message in err.getvalue()
    assert out.getvalue() == ""


def test_table_of_the_jobs_of_several_replicas() -> None:
    survey = Survey({"pw-0": "10.0.0.1:1", "pw-1": "10.0.0.2:1"}, {"10.0.0.3:1": "UNAVAILABLE: refused"})
    jobs = [_job(job_id="pw-0.a", home="pw-0"), _job(job_id="pw-1.b", home="pw-1")]
    header, first, second, replicas = format_jobs(jobs, "dns:///pw:1", survey).splitlines()
    assert header.split()[:3] == ["JOB", "HOME", "DATASET"]
    assert first.split()[:2] == ["pw-0.a", "pw-0"] and second.split()[:2] == ["pw-1.b", "pw-1"]
    assert replicas == (
        "replicas: pw-0 at 10.0.0.1:1, pw-1 at 10.0.0.2:1; no answer from 10.0.0.3:1 (UNAVAILABLE: refused)"
    )
    assert format_jobs([], "dns:///pw:1", Survey({"pw-0": "10.0.0.1:1"})).splitlines() == [
        "no assembly jobs on dns:///pw:1",
        "replicas: pw-0 at 10.0.0.1:1",
    ]
    assert format_job(_job(home="pw-1")).startswith("job brains on vary (home pw-1): active, ")
