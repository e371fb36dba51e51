"""The server's settings (``patchwire.service._settings``): one per ServerConfig field, from a TOML file, the
environment and flags in that order of precedence; byte sizes with units, relative paths from the file's folder, the
[limits] table, inline identities; every problem named with where it came from."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from patchwire.service import Limits, ServerConfig
from patchwire.service._auth import token_digest
from patchwire.service._settings import (
    INTERNAL,
    REDACTED,
    ConfigError,
    LoggingConfig,
    Setting,
    defaults,
    load,
    render,
    settings,
)

MiB = 1 << 20
GiB = 1 << 30
TOKEN = "s3cret-token-0123456789"
TLS = ("tls_cert", "tls_key", "tls_client_ca")


def _file(tmp_path: Path, text: str, name: str = "patchwire.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _problems(*args: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        load(*args, **kwargs)
    return list(refused.value.problems)


# -- the schema -------------------------------------------------------------------------------------------------------


def test_every_server_config_field_is_a_documented_setting() -> None:
    known = settings()
    for f in dataclasses.fields(ServerConfig):
        if f.name in INTERNAL:
            assert f.name not in known
        elif f.name == "limits":
            assert {f"limits.{g.name}" for g in dataclasses.fields(Limits)} <= set(known)
        else:
            assert f.name in known
    assert {"log_level", "log_format"} <= set(known)
    for setting in known.values():
        assert setting.doc, f"{setting.key} has no docstring"


def _sample(setting: Setting) -> tuple[Any, Any]:
    """A value for ``setting`` other than its default, as TOML writes it and as the config then holds it."""
    special: dict[str, tuple[Any, Any]] = {
        "datasets": ({"a": "/d/a.h5"}, {"a": Path("/d/a.h5")}),
        "replica_id": ("r-7", "r-7"),
        "log_level": ("debug", "DEBUG"),
        "log_format": ("json", "json"),
        "host": ("0.0.0.0", "0.0.0.0"),
        "auth": ({"identity": [{"name": "alice", "roles": ["read"], "token": [TOKEN]}]}, None),
    }
    if setting.key in special:
        return special[setting.key]
    kind = setting.kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    default = setting.default
    if setting.name.endswith("_bytes"):
        return "3MiB", 3 * MiB
    if kind is bool:
        return (not default), (not default)
    if kind is int:
        value = 2 if default in (None, 1) else default + 1
        return value, value
    if kind is float:
        return 2.5, 2.5
    if kind is Path:
        return "/abs/p", Path("/abs/p")
    if kind is str:
        return "x", "x"
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if item is int:
            return [5, 7], (5, 7)
        return list(default[:1]), tuple(default[:1])  # a codec list: one of the defaults, surely valid
    raise AssertionError(f"no sample for {setting.key}: {setting.kind}")


@pytest.mark.parametrize("key", list(settings()))
def test_every_setting_reaches_the_config_from_the_file(tmp_path: Path, key: str) -> None:
    setting = settings()[key]
    raw, expected = _sample(setting)
    table, _, name = key.rpartition(".")
    text = _table(key, raw) if setting.is_table else (f"[{table}]\n" if table else "") + f"{name} = {_toml(raw)}\n"
    if key in TLS:  # the three go together
        text = "".join(f'{k} = "/abs/p"\n' for k in TLS)
    loaded = load(_file(tmp_path, text), require_datasets=False)
    value = loaded.value(key)
    if key == "auth":
        assert value.identify_token(TOKEN).name == "alice"
    else:
        assert value == expected
        assert value != setting.default
    assert loaded.sources[key] == str(tmp_path / "patchwire.toml")


@pytest.mark.parametrize("key", [k for k, s in settings().items() if not s.is_table])
def test_every_value_setting_reaches_the_config_from_the_environment(key: str) -> None:
    setting = settings()[key]
    raw, expected = _sample(setting)
    text = raw if isinstance(raw, str) else ",".join(map(str, raw)) if isinstance(raw, list) else str(raw).lower()
    environ = {settings()[k].env: "/abs/p" for k in TLS} if key in TLS else {}
    loaded = load(environ={**environ, setting.env: text}, require_datasets=False)
    assert loaded.value(key) == expected
    assert loaded.sources[key] == f"environment {setting.env}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _table(key: str, raw: dict[str, Any]) -> str:
    if key == "auth":
        (entry,) = raw["identity"]
        return "[[auth.identity]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in entry.items())
    return f"[{key}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in raw.items())


# -- precedence -------------------------------------------------------------------------------------------------------


def test_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = _file(tmp_path, 'port = 1000\nhost = "0.0.0.0"\n[datasets]\na = "/d/a.h5"\n')
    environ = {"PATCHWIRE_PORT": "2000", "PATCHWIRE_GRACE_SECONDS": "9"}
    flags = {"port": 3000}

    assert load(require_datasets=False).config.port == 50051
    assert load(file).config.port == 1000
    assert load(file, environ).config.port == 2000
    both = load(file, environ, flags, {"port": "--port"})
    assert (both.config.port, both.config.host, both.config.grace_seconds) == (3000, "0.0.0.0", 9.0)
    assert both.sources == {
        "port": "--port",
        "host": str(file),
        "grace_seconds": "environment PATCHWIRE_GRACE_SECONDS",
        "datasets": str(file),
    }
    assert both.config.read_threads == ServerConfig(datasets={}).read_threads  # nobody set it: the dataclass's


def test_datasets_merge_by_name_across_layers(tmp_path: Path) -> None:
    file = _file(tmp_path, '[datasets]\na = "/d/a.h5"\nb = "/d/b.h5"\n')
    loaded = load(file, {"PATCHWIRE_DATASETS__c": "/d/c.h5"}, {"datasets": {"b": Path("/e/b.h5")}})
    assert loaded.config.datasets == {"a": Path("/d/a.h5"), "b": Path("/e/b.h5"), "c": Path("/d/c.h5")}


def test_no_dataset_anywhere_is_a_problem() -> None:
    (problem,) = _problems()
    assert "no dataset" in problem and "[datasets] table" in problem and "PATCHWIRE_DATASETS__NAME" in problem


# -- values -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "size"),
    [("1000", 1000), ('"512MiB"', 512 * MiB), ('"1GiB"', GiB), ('"1.5KiB"', 1536), ('"1 GB"', 10**9), ("0", 0)],
)
def test_byte_sizes_take_units(tmp_path: Path, written: str, size: int) -> None:
    file = _file(tmp_path, f"cache_bytes = {written}\n[limits]\nmax_post_bytes = {written}\n")
    if size == 0:  # a cache may be off; a limit may not
        assert _problems(file, require_datasets=False) == [
            f"{file}: limits.max_post_bytes: Input should be greater than or equal to 1 (got 0)"
        ]
        return
    loaded = load(file, require_datasets=False)
    assert (loaded.config.cache_bytes, loaded.config.limits.max_post_bytes) == (size, size)


def test_wrong_values_are_named_with_their_file_key_and_input(tmp_path: Path) -> None:
    file = _file(
        tmp_path,
        'port = 70000\ncache_bytes = "lots"\nshared_memory_uids = [1, "x"]\nread_threads = 1.5\n'
        'log_format = "yaml"\n[datasets]\n"" = "/d/a.h5"\n',
    )
    assert _problems(file) == [
        f"{file}: port: Input should be less than or equal to 65535 (got 70000)",
        f"{file}: cache_bytes: could not parse value and unit from byte string (got 'lots')",
        f"{file}: shared_memory_uids: [1]: Input should be a valid integer, unable to parse string as an integer "
        "(got 'x')",
        f"{file}: read_threads: Input should be a valid integer, got a number with a fractional part (got 1.5)",
        f"{file}: log_format: Input should be 'text' or 'json' (got 'yaml')",
        f"{file}: datasets: name '': String should have at least 1 character (got '')",
        "no dataset: give at least one --dataset NAME=PATH.h5 (or --phantom), a [datasets] table in the "
        'configuration file (NAME = "PATH.h5") or PATCHWIRE_DATASETS__NAME=PATH.h5',
    ]


def test_unknown_keys_are_refused_with_a_close_match(tmp_path: Path) -> None:
    file = _file(
        tmp_path,
        'prot = 1\nworker_index = 2\nzzz = 3\nlimits = 4\n[datasets]\na = "/d/a.h5"\n[limits_]\n'
        "[auth]\nidentities = []\n",
    )
    assert _problems(file) == [
        f"{file}: unknown key 'prot' (did you mean 'port'?)",
        f"{file}: unknown key 'worker_index' (the server sets it itself)",
        f"{file}: unknown key 'zzz'",
        f"{file}: limits: expected a table [limits], got 4",
        f"{file}: unknown key 'limits_' (did you mean 'limits'?)",
        f"{file}: auth: unknown keys ['identities']: the file holds [[identity]] tables",
    ]
    nested = _file(tmp_path, "[limits]\nmax_cals = 3\n", "nested.toml")
    assert _problems(nested, require_datasets=False) == [
        f"{nested}: unknown key 'limits.max_cals' (did you mean 'limits.max_calls'?)"
    ]


def test_unreadable_files(tmp_path: Path) -> None:
    assert _problems(tmp_path / "missing.toml", require_datasets=False)[0].startswith(
        f"{tmp_path / 'missing.toml'}: cannot read: "
    )
    broken = _file(tmp_path, "port = \n")
    assert _problems(broken, require_datasets=False)[0].startswith(f"{broken}: not valid TOML: ")


def test_relative_paths_are_relative_to_the_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _file(
        tmp_path / "etc",
        'state_dir = "state"\ntls_cert = "/abs/server.crt"\ntls_key = "../keys/server.key"\n'
        '[datasets]\nbrains = "data/brains.h5"\n',
    )
    monkeypatch.chdir(tmp_path)
    config = load(Path("etc/patchwire.toml"), {"PATCHWIRE_SHARED_MEMORY_DIR": "shm"}).config
    assert config.state_dir == tmp_path / "etc" / "state"
    assert config.datasets == {"brains": tmp_path / "etc" / "data" / "brains.h5"}
    assert (config.tls_cert, config.tls_key) == (Path("/abs/server.crt"), tmp_path / "etc" / ".." / "keys/server.key")
    assert config.shared_memory_dir == Path("shm")  # the environment's and the flags' stay as given (the cwd's)


def test_the_limits_table_and_its_variables(tmp_path: Path) -> None:
    file = _file(tmp_path, '[limits]\nmax_calls = 7\nmax_jobs = 5\nmax_disk_bytes = "2GiB"\n')
    limits = load(
        file,
        {"PATCHWIRE_LIMITS__MAX_JOBS": "3", "PATCHWIRE_LIMITS__MAX_POST_BYTES": "2MiB"},
        {"limits.max_indices": 9},
        require_datasets=False,
    ).config.limits
    assert limits == dataclasses.replace(
        Limits(), max_calls=7, max_jobs=3, max_disk_bytes=2 * GiB, max_post_bytes=2 * MiB, max_indices=9
    )
    assert _problems(environ={"PATCHWIRE_LIMITS__MAX_JOB": "3"}, require_datasets=False) == [
        "environment PATCHWIRE_LIMITS__MAX_JOB: not a setting (did you mean 'PATCHWIRE_LIMITS__MAX_JOBS'?)"
    ]


def test_the_environment_outside_the_settings_is_left_alone() -> None:
    environ = {
        "PATCHWIRE_HOME": "/somewhere",
        "PATCHWIRE_TOKEN": TOKEN,
        "PATCHWIRE_HEALTH_TIMEOUT": "3",
        "PATCHWIRE_PROT": "1",
        "PATCHWIRE_PORT": "",  # empty: unset
        "PATH": "/bin",
    }
    loaded = load(environ=environ, require_datasets=False)
    assert loaded.config.port == 50051 and loaded.sources == {}


def test_lists_and_tables_from_the_environment() -> None:
    environ = {"PATCHWIRE_SHARED_MEMORY_UIDS": "5, 7", "PATCHWIRE_DATASETS": '{"a": "/d/a.h5"}'}
    loaded = load(environ=environ)
    assert (loaded.config.shared_memory_uids, loaded.config.datasets) == ((5, 7), {"a": Path("/d/a.h5")})
    assert load(environ={"PATCHWIRE_SHARED_MEMORY_UIDS": "[9]"}, require_datasets=False).config.shared_memory_uids == (
        9,
    )
    assert _problems(environ={"PATCHWIRE_DATASETS": "{oops"}, require_datasets=False)[0].startswith(
        "environment PATCHWIRE_DATASETS: not valid JSON: "
    )


# -- identities and combinations --------------------------------------------------------------------------------------


def test_inline_identities_use_the_auth_files_parser(tmp_path: Path) -> None:
    file = _file(
        tmp_path,
        '[[auth.identity]]\nname = "alice"\nroles = ["read", "write"]\n'
        f'token = ["{TOKEN}"]\nsubjects = ["CN=alice"]\n'
        f'[[auth.identity]]\nname = "bob"\nroles = ["admin"]\ntoken_sha256 = ["{token_digest("b" * 20).hex()}"]\n',
    )
    auth = load(file, require_datasets=False).config.auth
    assert auth is not None
    assert auth.identify_token(TOKEN).name == "alice"  # type: ignore[union-attr]
    assert auth.identify_token("b" * 20).name == "bob"  # type: ignore[union-attr]
    assert auth.subjects["CN=alice"].roles == frozenset({"read", "write"})
    bad = _file(tmp_path, '[[auth.identity]]\nname = "eve"\nroles = ["root"]\ntoken = ["x"]\n', "bad.toml")
    assert _problems(bad, require_datasets=False) == [
        f"{bad}: auth: identity[0].roles: a non-empty list of read, write, admin"
    ]


def test_values_that_do_not_go_together_name_where_they_came_from(tmp_path: Path) -> None:
    file = _file(tmp_path, 'tls_cert = "/c.pem"\nauth_config = "/auth.toml"\n[[auth.identity]]\nname = "a"\n'
                 'roles = ["read"]\nsubjects = ["CN=a"]\n')  # fmt: skip
    assert _problems(file, flags={"tls_client_ca": Path("ca.pem")}, require_datasets=False) == [
        f"tls_cert and tls_key (--tls-cert, --tls-key) go together (tls_client_ca needs them); given: tls_cert (from "
        f"{file}), tls_client_ca (from --tls-client-ca)",
        f"give identities in one place: auth_config (from {file}) or auth (from {file}), not both",
    ]


def test_the_server_configs_own_checks_are_problems_too() -> None:
    (problem,) = _problems(environ={"PATCHWIRE_REPLICA_ID": "a.b"}, require_datasets=False)
    assert "replica" in problem


# -- writing ----------------------------------------------------------------------------------------------------------


def test_the_rendered_configuration_loads_back_to_the_same(tmp_path: Path) -> None:
    file = _file(
        tmp_path,
        'port = 6000\ncache_bytes = "512MiB"\nshared_memory_uids = [5]\nstate_dir = "state"\n'
        '[datasets]\n"my brains" = "b.h5"\n[limits]\nmax_calls = 7\nmax_post_bytes = 1000\n',
    )
    loaded = load(file, {"PATCHWIRE_HOST": "0.0.0.0"})
    text = render(loaded, "title")
    tomllib.loads(text)
    again = load(_file(tmp_path / "elsewhere", text))
    assert again.config == loaded.config and again.logging == loaded.logging
    assert "port = 6000  # from " + str(file) in text
    assert 'host = "0.0.0.0"  # from environment PATCHWIRE_HOST' in text
    assert 'cache_bytes = "512MiB"' in text and "max_post_bytes = 1000" in text


def test_the_rendered_configuration_redacts_tokens(tmp_path: Path) -> None:
    file = _file(tmp_path, f'[[auth.identity]]\nname = "alice"\nroles = ["read"]\ntoken = ["{TOKEN}"]\n')
    text = render(load(file, require_datasets=False))
    assert TOKEN not in text and token_digest(TOKEN).hex() not in text
    assert tomllib.loads(text)["auth"]["identity"] == [{"name": "alice", "roles": ["read"], "token_sha256": [REDACTED]}]


def test_the_defaults_document_every_setting() -> None:
    text = render(defaults())
    parsed = tomllib.loads(text)
    for key, setting in settings().items():
        table, _, name = key.rpartition(".")
        value = defaults().value(key)
        if setting.is_table:
            assert f"[{key}]" in text
        elif value is None:
            assert f"# {name} is not set" in text
        else:
            assert name in (parsed[table] if table else parsed), key
    assert parsed["port"] == 50051 and parsed["limits"]["max_job_disk_bytes"] == "32GiB"
    assert parsed["log_level"] == LoggingConfig().log_level
