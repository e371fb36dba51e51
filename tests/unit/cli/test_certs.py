"""``patchwire certs``: its arguments, the files it writes and what it prints, and a folder it cannot write."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchwire.cli import build_parser, main

FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key", "auth.toml")


def test_arguments() -> None:
    args = build_parser().parse_args(["certs", "out"])
    assert (args.directory, args.host) == (Path("out"), [])
    args = build_parser().parse_args(["certs", "out", "--host", "a.example", "--host", "10.0.0.1"])
    assert args.host == ["a.example", "10.0.0.1"]


def test_a_folder_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["certs"])
    assert exited.value.code == 2
    assert "the following arguments are required: directory" in capsys.readouterr().err


def test_writes_the_set_and_says_how_to_use_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "made" / "here"
    assert main(["--log-level", "WARNING", "certs", str(d), "--host", "data.example"]) == 0
    for name in (*FILES, "reader.token", "writer.token", "admin.token"):
        assert (d / name).is_file(), name
    assert (d / "server.key").stat().st_mode & 0o777 == 0o600
    assert capsys.readouterr().out.splitlines() == [
        f"wrote a development CA, server and client certificates, auth.toml and tokens to {d}",
        f"  serve:  patchwire serve --tls-cert {d / 'server.crt'} --tls-key {d / 'server.key'} "
        f"--auth-config {d / 'auth.toml'} [--tls-client-ca {d / 'ca.crt'}] ...",
        f"  status: patchwire status HOST:PORT --ca-cert {d / 'ca.crt'} --token-file {d / 'admin.token'}",
    ]


def test_a_folder_that_cannot_be_made_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["certs", str(blocker)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("patchwire certs: ")
