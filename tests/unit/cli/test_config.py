"""``patchwire config``: ``check FILE`` prints the effective configuration (environment applied, secrets redacted) or
every problem with exit status 2; ``defaults`` prints the documented reference; the repository's container
configuration checks clean."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from patchwire.cli import build_parser, main
from patchwire.cli import config as config_command
from patchwire.service._settings import settings

DOCKER_CONFIG = Path(__file__).resolve().parents[3] / "docker" / "patchwire.toml"
TOKEN = "s3cret-token-0123456789"


def _check(file: Path, environ: dict[str, str] | None = None) -> int:
    return config_command.run(build_parser().parse_args(["config", "check", str(file)]), environ or {})


def test_check_prints_the_effective_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "server.toml"
    file.write_text(
        'port = 6000\nstate_dir = "state"\n[datasets]\nbrains = "brains.h5"\n'
        f'[limits]\nmax_calls = 7\n[[auth.identity]]\nname = "alice"\nroles = ["read"]\ntoken = ["{TOKEN}"]\n'
    )
    assert _check(file, {"PATCHWIRE_PORT": "7000", "PATCHWIRE_LIMITS__MAX_JOBS": "3"}) == 0
    out = capsys.readouterr().out
    effective = tomllib.loads(out)
    assert effective["port"] == 7000 and effective["state_dir"] == str(tmp_path / "state")
    assert effective["datasets"] == {"brains": str(tmp_path / "brains.h5")}
    assert (effective["limits"]["max_calls"], effective["limits"]["max_jobs"]) == (7, 3)
    assert effective["host"] == "127.0.0.1"  # defaults too
    assert "port = 7000  # from environment PATCHWIRE_PORT" in out
    assert "# Port to bind; 0 picks a free one" in out  # each setting under its documentation
    assert TOKEN not in out and effective["auth"]["identity"][0]["token_sha256"] == ["<redacted>"]


def test_check_prints_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "server.toml"
    file.write_text('prot = 6000\ncache_bytes = "lots"\n[datasets]\na = "a.h5"\n')
    assert _check(file, {"PATCHWIRE_LIMITS__MAX_CALLS": "0"}) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"patchwire config check: {file}: unknown key 'prot' (did you mean 'port'?)",
        f"patchwire config check: {file}: cache_bytes: could not parse value and unit from byte string (got 'lots')",
        "patchwire config check: environment PATCHWIRE_LIMITS__MAX_CALLS: Input should be greater than or equal to "
        "1 (got '0')",
    ]


def test_defaults_are_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "defaults"]) == 0
    out = capsys.readouterr().out
    reference = tomllib.loads(out)
    assert reference["port"] == 50051 and reference["limits"]["max_calls"] == 256
    for key in settings():
        assert key.rpartition(".")[2] in out


def test_a_file_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["config", "check"])
    assert exited.value.code == 2
    assert "the following arguments are required: FILE" in capsys.readouterr().err


def test_the_container_configuration_checks_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(DOCKER_CONFIG) == 0
    effective = tomllib.loads(capsys.readouterr().out)
    assert (effective["host"], effective["port"], effective["metrics_port"]) == ("0.0.0.0", 50051, 9090)
    assert effective["state_dir"] == "/state"
    assert all(path.startswith("/data/") for path in effective["datasets"].values())
    assert all(effective[k].startswith("/run/secrets/") for k in ("tls_cert", "tls_key", "auth_config"))
