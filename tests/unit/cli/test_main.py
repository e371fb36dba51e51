"""The ``patchwire`` command's dispatch: its subcommands, and what building its parser imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from patchwire.cli import build_parser

WAIT_S = 60


def test_subcommands_in_order() -> None:
    help_text = build_parser().format_help()
    assert "{serve,config,status,top,demo,certs}" in help_text
    assert build_parser().parse_args(["--log-level", "debug", "certs", "d"]).log_level == "debug"


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([])
    assert exited.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_the_parser_and_serve_load_no_client_code() -> None:
    code = (
        "import sys\n"
        "import patchwire.cli, patchwire.cli.serve\n"
        "patchwire.cli.build_parser().parse_args(['serve', '--port', '0'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('patchwire.client')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
