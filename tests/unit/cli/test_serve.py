"""``patchwire serve``'s flags, without a server: what reaches ServerConfig and Limits, and what is refused with
exit status 2 and a message."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from patchwire.cli import build_parser, main
from patchwire.cli.serve import DEFAULT_CACHE_MB, UsageError, server_config, server_settings
from patchwire.service import Limits, ServerConfig
from patchwire.service import _phantom as phantom_module

MIB = 1 << 20


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    path = tmp_path / "a.h5"
    path.write_bytes(b"")  # parsing checks only that the file exists
    return path


def _config(*args: str) -> ServerConfig:
    return server_config(build_parser().parse_args(["serve", *args]), environ={})


def test_defaults_are_the_server_configs(h5: Path) -> None:
    config = _config("--dataset", f"a={h5}")
    assert config == ServerConfig(datasets={"a": h5}, cache_bytes=DEFAULT_CACHE_MB * MIB, limits=Limits())
    assert (config.host, config.port, config.read_threads, config.grace_seconds) == ("127.0.0.1", 50051, 4, 5.0)
    assert (config.workers, config.worker_index, config.run_dir) == (0, 0, None)
    assert (config.state_dir, config.shared_memory, config.shared_memory_uids, config.verify) == (
        None,
        True,
        None,
        False,
    )
    assert config.assembly_memory_bytes == 1024 * MIB and config.cache_bytes == 1024 * MIB


def test_every_flag_reaches_the_config(h5: Path, tmp_path: Path) -> None:
    other = tmp_path / "b.h5"
    other.write_bytes(b"")
    config = _config(
        "-d", f"a={h5}", "--dataset", f"b={other}", "--host", "0.0.0.0", "--port", "0", "--read-threads", "2",
        "--workers", "3", "--grace", "1.5", "--state-dir", str(tmp_path / "state"), "--assembly-memory", "8",
        "--cache-mb", "0.5",
        "--no-shared-memory", "--shared-memory-uid", "5", "--shared-memory-uid", "7",
        "--shared-memory-dir", str(tmp_path / "shm"), "--verify", "--tls-cert", "c.pem", "--tls-key", "k.pem",
        "--tls-client-ca", "ca.pem", "--auth-config", "auth.toml",
    )  # fmt: skip
    assert config.datasets == {"a": h5, "b": other}
    assert (config.host, config.port, config.read_threads, config.grace_seconds) == ("0.0.0.0", 0, 2, 1.5)
    assert config.workers == 3
    assert config.state_dir == tmp_path / "state"
    assert (config.assembly_memory_bytes, config.cache_bytes) == (8 * MIB, MIB // 2)
    assert (config.shared_memory, config.shared_memory_uids) == (False, (5, 7))
    assert config.shared_memory_dir == tmp_path / "shm"
    assert config.verify
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    assert config.auth_config == Path("auth.toml")


def test_limit_flags_reach_limits(h5: Path) -> None:
    limits = _config("-d", f"a={h5}", "--max-calls", "7", "--max-post-mb", "0.5", "--max-spec-depth", "3").limits
    assert (limits.max_calls, limits.max_post_bytes, limits.max_spec_depth) == (7, 1 << 19, 3)
    assert limits.max_jobs == Limits().max_jobs


def test_a_later_port_wins(h5: Path) -> None:
    assert _config("--port", "0", "-d", f"a={h5}", "--port", "4242").port == 4242


def test_phantom_is_made_in_the_given_home_and_served_as_phantom(
    h5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = tmp_path / "phantom-v1.h5"
    seen: list[object] = []

    def fake_phantom(path: Path | None = None, environ: object = None) -> Path:
        seen.append(environ)
        return made

    monkeypatch.setattr(phantom_module, "ensure_phantom_dataset", fake_phantom)
    args = build_parser().parse_args(["serve", "-d", f"a={h5}", "--phantom"])
    environ = {"PATCHWIRE_HOME": str(tmp_path)}
    assert server_config(args, environ).datasets == {"a": h5, "phantom": made}
    assert seen == [environ]
    with pytest.raises(UsageError, match="dataset name given twice: phantom"):
        server_config(build_parser().parse_args(["serve", "-d", f"phantom={h5}", "--phantom"]), environ)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give at least one --dataset NAME=PATH.h5 (or --phantom)"),
        (("-d", "a={h5}", "-d", "a={h5}"), "dataset name given twice: a"),
        (("-d", "a={h5}", "--tls-cert", "c.pem"), "tls_cert and tls_key (--tls-cert, --tls-key) go together"),
        (("-d", "a={h5}", "--tls-key", "k.pem"), "given: tls_key (from --tls-key)"),
        (("-d", "a={h5}", "--tls-client-ca", "ca.pem"), "(tls_client_ca needs them)"),
        (("-d", "a={h5}", "--workers", "-1"), "--workers: Input should be greater than or equal to 0 (got -1)"),
        (("-d", "a={h5}", "--read-threads", "0"), "--read-threads: Input should be greater than or equal to 1"),
        (("-d", "a={h5}", "--port", "70000"), "--port: Input should be less than or equal to 65535"),
    ],
)
def test_flags_that_do_not_go_together_exit_2(
    h5: Path, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(h5=h5) for a in args]
    with pytest.raises(UsageError) as refused:
        _config(*argv)
    assert message in str(refused.value)
    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchwire serve: ") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dataset", "{h5}"), "expected NAME=PATH.h5"),
        (("--dataset", "a="), "expected NAME=PATH.h5"),
        (("--dataset", "a={missing}"), "no such file"),
        (("--port", "x"), "invalid int value: 'x'"),
        (("--cache-mb", "lots"), "expected a number, got 'lots'"),
        (("--cache-mb", "-1"), "must be at least 0, got -1"),
        (("--max-calls", "0"), "must be positive, got 0"),
        (("--max-disk-mb", "-1"), "must be positive"),
        (("--max-jobs", "x"), "expected a number, got 'x'"),
        (("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
    ],
)
def test_invalid_flags_exit_2_with_a_message(
    h5: Path, tmp_path: Path, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(h5=h5, missing=tmp_path / "missing.h5") for a in args]
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: patchwire") and message in err


def test_the_replica_id_flag_reaches_the_config_and_is_checked(h5: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _config("-d", f"a={h5}", "--replica-id", "patchwire-3").replica_id == "patchwire-3"
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "-d", f"a={h5}", "--replica-id", "pw.3"])
    assert exited.value.code == 2
    assert "--replica-id: 'pw.3' is not a replica id" in capsys.readouterr().err
    with pytest.raises(ValueError, match="replica_id: 'a b' is not a replica id"):
        ServerConfig(datasets={"a": h5}, replica_id="a b")


# -- with a configuration file ----------------------------------------------------------------------------------------


def test_flags_given_override_the_environment_which_overrides_the_file(h5: Path, tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text(f'port = 1000\nhost = "0.0.0.0"\ncache_bytes = "2MiB"\n[datasets]\nb = "{h5}"\n[limits]\n'
                    "max_calls = 7\nmax_jobs = 5\n")  # fmt: skip
    environ = {"PATCHWIRE_PORT": "2000", "PATCHWIRE_LIMITS__MAX_JOBS": "4"}

    def config(*flags: str) -> ServerConfig:
        return server_config(build_parser().parse_args(["serve", "--config", str(file), *flags]), environ)

    plain = config()
    assert (plain.port, plain.host, plain.cache_bytes, plain.datasets) == (2000, "0.0.0.0", 2 * MIB, {"b": h5})
    assert (plain.limits.max_calls, plain.limits.max_jobs) == (7, 4)
    flagged = config("--port", "3000", "--cache-mb", "1", "--max-jobs", "3", "-d", f"a={h5}")
    assert (flagged.port, flagged.host, flagged.cache_bytes) == (3000, "0.0.0.0", MIB)
    assert (flagged.limits.max_calls, flagged.limits.max_jobs) == (7, 3)
    assert flagged.datasets == {"b": h5, "a": h5}  # flags add datasets to the file's


def test_the_log_level_flag_overrides_the_files(h5: Path, tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text(f'log_level = "warning"\n[datasets]\na = "{h5}"\n')
    parse = build_parser().parse_args
    assert server_settings(parse(["serve", "--config", str(file)]), {}).logging.log_level == "WARNING"
    assert server_settings(parse(["--log-level", "debug", "serve", "--config", str(file)]), {}).logging.log_level == (
        "DEBUG"
    )


def test_a_bad_file_exits_2_naming_every_problem(h5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "server.toml"
    file.write_text("prot = 1\n[limits]\nmax_calls = 0\n")
    assert main(["serve", "--config", str(file), "-d", f"a={h5}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"patchwire serve: {file}: unknown key 'prot' (did you mean 'port'?)",
        f"patchwire serve: {file}: limits.max_calls: Input should be greater than or equal to 1 (got 0)",
    ]


def test_help_shows_the_dataclasses_defaults() -> None:
    help_text = " ".join(_serve_parser().format_help().split())
    defaults = ServerConfig(datasets={})
    assert f"(0 picks a free one; default {defaults.port})" in help_text
    assert f"(default {defaults.read_threads})" in help_text
    assert f"in MB (0 disables; default {defaults.cache_bytes // MIB})" in help_text
    assert f"(default {Limits().max_calls})" in help_text


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]
