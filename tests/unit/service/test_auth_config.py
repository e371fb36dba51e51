"""Units of authentication: the TOML config, the authenticator, the role table, the loopback warning."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

import pytest

from patchwire.cli import main
from patchwire.service import _auth
from patchwire.service._auth import (
    ADMIN,
    ANONYMOUS,
    READ,
    WRITE,
    AuthConfigError,
    Identity,
    load_auth_config,
    parse_auth_config,
    required_role,
    token_digest,
)
from patchwire.service._errors import PermissionDenied, Unauthenticated
from patchwire.service._tls import exposed_without_tls, is_loopback

TOKEN = "s3cret-token-of-alice-0123456789"
CONFIG = f"""
[[identity]]
name = "alice"
roles = ["read", "write"]
token_sha256 = ["{token_digest(TOKEN).hex()}"]

[[identity]]
name = "ops"
roles = ["admin"]
token = "plain-token-of-ops-0123456789"
subjects = ["CN=ops-box,O=lab", "CN=ops-laptop"]
"""


def _auth_of(text: str = CONFIG) -> _auth.Authenticator:
    return parse_auth_config(tomllib.loads(text))


def test_tokens_by_digest_or_plain_and_subjects() -> None:
    auth = _auth_of()
    alice = auth.authenticate([("authorization", f"Bearer {TOKEN}")], {})
    assert alice == Identity("alice", frozenset({READ, WRITE}))
    ops = auth.authenticate([("authorization", "bearer plain-token-of-ops-0123456789")], {})
    assert ops.name == "ops" and ops.has(WRITE) and ops.owns("alice")
    # certificates: the full subject, or the common name alone
    assert auth.authenticate([], {"x509_subject": [b"CN=ops-box,O=lab"]}).name == "ops"
    assert auth.authenticate([], {"x509_subject": [b"CN=ops-laptop,O=x"], "x509_common_name": [b"ops-laptop"]}) == ops


@pytest.mark.parametrize(
    ("metadata", "context", "message"),
    [
        ([], {}, "credentials required"),
        ([("authorization", "Bearer nope")], {}, "unknown token"),
        ([("authorization", TOKEN)], {}, "expected 'Bearer <token>'"),
        ([("authorization", "Bearer ")], {}, "expected 'Bearer <token>'"),
        ([], {"x509_subject": [b"CN=stranger"], "x509_common_name": [b"stranger"]}, "not mapped"),
        # a wrong token is refused even with a known certificate
        ([("authorization", "Bearer nope")], {"x509_subject": [b"CN=ops-box,O=lab"]}, "unknown token"),
    ],
)
def test_unknown_or_missing_credentials_are_unauthenticated(metadata: Any, context: Any, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        _auth_of().authenticate(metadata, context)


class _Context:
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def test_roles_of_methods_and_permission_denied() -> None:
    assert required_role("/patchwire.v1.DatasetService/StreamBatches") == READ
    assert required_role("/patchwire.v1.AssemblyService/DeleteJob") == WRITE
    assert required_role("/patchwire.v1.AssemblyService/SomethingNew") == ADMIN  # closed until listed
    # any known identity may register shared memory: each call that uses a region needs its own role
    assert required_role("/patchwire.v1.AssemblyService/RegisterSharedMemory") is None
    reader = parse_auth_config(
        tomllib.loads('[[identity]]\nname = "r"\nroles = ["read"]\ntoken = "reader-token-0123456789"')
    )
    context = _Context([("authorization", "Bearer reader-token-0123456789")])
    assert reader.authorize(context, "/patchwire.v1.DatasetService/GetSamples", READ).name == "r"
    with pytest.raises(PermissionDenied, match="'r' lacks the 'write' role"):
        reader.authorize(context, "/patchwire.v1.AssemblyService/CreateJob", WRITE)


def test_every_method_of_every_service_has_a_role() -> None:
    from google.protobuf import descriptor_pool

    for service in ("patchwire.v1.DatasetService", "patchwire.v1.AssemblyService", "patchwire.v1.ServerService"):
        for m in descriptor_pool.Default().FindServiceByName(service).methods:
            assert f"/{service}/{m.name}" in _auth.METHOD_ROLES, m.name


def test_ownership() -> None:
    alice = Identity("alice", frozenset({WRITE}))
    assert alice.owns("alice") and not alice.owns("bob") and not alice.owns(None)
    assert ANONYMOUS.owns(None) and ANONYMOUS.owns("bob")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one"),
        ("[other]\nx = 1", "unknown keys"),
        ('[[identity]]\nroles = ["read"]\ntoken = "0123456789abcdefgh"', "name"),
        ('[[identity]]\nname = "anonymous"\nroles = ["read"]\ntoken = "0123456789abcdefgh"', "name"),
        ('[[identity]]\nname = "a"\nroles = ["root"]\ntoken = "0123456789abcdefgh"', "roles"),
        ('[[identity]]\nname = "a"\nroles = ["read"]', "nobody could be"),
        ('[[identity]]\nname = "a"\nroles = ["read"]\ntoken = "short"', "at least 16"),
        ('[[identity]]\nname = "a"\nroles = ["read"]\ntoken_sha256 = "abcd"', "64 hex digits"),
        ('[[identity]]\nname = "a"\nroles = ["read"]\ntoken = "0123456789abcdefgh"\npassword = "x"', "unknown keys"),
        (
            '[[identity]]\nname = "a"\nroles = ["read"]\ntoken = "0123456789abcdefgh"\n'
            '[[identity]]\nname = "b"\nroles = ["read"]\ntoken = "0123456789abcdefgh"',
            "more than one identity",
        ),
        (
            '[[identity]]\nname = "a"\nroles = ["read"]\nsubjects = "CN=x"\n'
            '[[identity]]\nname = "a"\nroles = ["read"]\nsubjects = "CN=y"',
            "given twice",
        ),
        (
            '[[identity]]\nname = "a"\nroles = ["read"]\nsubjects = "CN=x"\n'
            '[[identity]]\nname = "b"\nroles = ["read"]\nsubjects = "CN=x"',
            "already belongs",
        ),
    ],
)
def test_bad_configs_name_the_offending_key(text: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        _auth_of(text)


def test_load_reads_through_an_injectable_reader() -> None:
    files = {Path("/etc/pw/auth.toml"): CONFIG.encode(), Path("/etc/pw/bad.toml"): b"[[identity"}
    auth = load_auth_config(Path("/etc/pw/auth.toml"), read=files.__getitem__)
    assert {identity.name for _, identity in auth.tokens} == {"alice", "ops"}
    with pytest.raises(AuthConfigError, match=r"bad\.toml: not valid TOML"):
        load_auth_config(Path("/etc/pw/bad.toml"), read=files.__getitem__)

    def missing(path: Path) -> bytes:
        raise FileNotFoundError(path)

    with pytest.raises(AuthConfigError, match="cannot read"):
        load_auth_config(Path("/nowhere.toml"), read=missing)


# -- the warning for a server others can reach in clear ------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("patchwire.example.org", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert (exposed_without_tls(host, tls=False) is None) is loopback
    assert exposed_without_tls(host, tls=True) is None


def test_serve_warns_before_binding_a_non_loopback_host_in_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The warning comes before anything is bound: a dataset that does not open ends the command first."""
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    with caplog.at_level(logging.WARNING):
        # one process: the server's own log record is made in this one (with several, in each worker)
        assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--workers", "1", "--dataset", f"x={broken}"]) == 1
    err = capsys.readouterr().err
    assert "WARNING: serving 0.0.0.0 without TLS" in err
    assert any("serving 0.0.0.0 without TLS" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # loopback: no warning
    caplog.clear()
    assert main(["serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1", "--dataset", f"x={broken}"]) == 1
    assert "without TLS" not in capsys.readouterr().err
    assert not any("without TLS" in r.getMessage() for r in caplog.records)


def test_serve_refuses_half_a_tls_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h5 = tmp_path / "x.h5"
    h5.write_bytes(b"")
    assert main(["serve", "--dataset", f"x={h5}", "--tls-cert", str(h5)]) == 2
    assert "tls_cert and tls_key (--tls-cert, --tls-key) go together" in capsys.readouterr().err


def test_serve_refuses_an_unusable_auth_config_before_opening_datasets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.h5"  # would fail too, but only after the auth config
    broken.write_bytes(b"not hdf5")
    config = tmp_path / "auth.toml"
    config.write_text('[[identity]]\nname = "a"\nroles = ["superuser"]\ntoken = "0123456789abcdefgh"\n')
    assert main(["serve", "--port", "0", "--dataset", f"x={broken}", "--auth-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "identity[0].roles" in err and "not in pymia format" not in err
