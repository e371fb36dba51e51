"""Checks for the container deployment in docker/: lint, compose resolution and the image's runtime contract.

No Docker engine and no network: hadolint and docker-compose (from the dev extra, next to ``sys.executable``) only
read files, and the health-check test talks to an in-process gRPC server on loopback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
BIN = Path(sys.executable).parent
TOOL_TIMEOUT_S = 120


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} not found at {path}; run scripts/setup.sh to install the dev tools", pytrace=False)
    return path


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no user config, no HADOLINT_*/COMPOSE_*/PATCHWIRE_* variables from the caller."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home), **extra}


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = []
    assert not pending, "Dockerfile ends inside a line continuation"
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def _final(keyword: str) -> list[str]:
    return [args for kw, args in _stages()[-1] if kw == keyword]


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    # An explicit config (rules: none ignored; even style findings count) so no local .hadolint.yaml can hide one.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    proc = subprocess.run(
        [_tool("hadolint"), "--config", config, "--format", "json", DOCKERFILE],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(tmp_path),
        timeout=TOOL_TIMEOUT_S,
    )
    findings = json.loads(proc.stdout or "null")
    assert findings == [], f"hadolint findings: {findings}\n{proc.stderr}"
    assert proc.returncode == 0, proc.stderr


def _compose_config(tmp_path: Path, **env: str) -> dict:
    proc = subprocess.run(
        [_tool("docker-compose"), "-f", COMPOSE, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(tmp_path, DOCKER_CONFIG=str(tmp_path / "docker"), **env),
        timeout=TOOL_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_compose_config_resolves(tmp_path: Path) -> None:
    service = _compose_config(tmp_path)["services"]["patchwire"]

    assert Path(service["build"]["context"]) == REPO
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert [(p["target"], p["published"]) for p in service["ports"]] == [(50051, "50051")]
    [volume] = service["volumes"]
    assert volume["type"] == "bind"
    assert volume["target"] == "/data"
    assert volume["read_only"] is True
    assert Path(volume["source"]) == REPO / "docker" / "data"
    assert service["stop_grace_period"] == "30s"
    assert service["restart"] == "unless-stopped"
    # No test command: the engine keeps the image's grpc.health.v1 HEALTHCHECK and takes only the timing from here.
    assert "test" not in service["healthcheck"]
    # TLS and tokens on, from secrets mounted under /run/secrets; the health check trusts the same CA
    command = service["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "serve" and flags["--host"] == "0.0.0.0"
    assert flags["--tls-cert"] == "/run/secrets/server.crt" and flags["--tls-key"] == "/run/secrets/server.key"
    assert flags["--auth-config"] == "/run/secrets/auth.toml"
    mounted = {s["target"] for s in service["secrets"]}
    assert mounted == {f"/run/secrets/{n}" for n in ("server.crt", "server.key", "ca.crt", "auth.toml")}
    assert service["environment"]["PATCHWIRE_HEALTH_CA"] == "/run/secrets/ca.crt"
    secrets = _compose_config(tmp_path)["secrets"]
    assert {Path(v["file"]).parent for v in secrets.values()} == {REPO / "docker" / "secrets"}


def test_compose_data_dir_comes_from_environment(tmp_path: Path) -> None:
    data = tmp_path / "volumes"
    [volume] = _compose_config(tmp_path, PATCHWIRE_DATA=str(data))["services"]["patchwire"]["volumes"]
    assert (Path(volume["source"]), volume["target"], volume["read_only"]) == (data, "/data", True)


def test_final_stage_installs_server_extra_only() -> None:
    installs = [args for args in _final("RUN") if "pip install" in args]
    assert installs, "the final stage installs nothing with pip"
    for line in installs:
        assert "torch" not in line.lower(), line
        assert "tensorflow" not in line.lower(), line
        assert set(re.findall(r"\[([A-Za-z0-9_,.\- ]+)\]", line)) == {"server"}, line


def test_image_runtime_contract() -> None:
    stages = _stages()
    assert len(stages) >= 2, "expected a multi-stage build"
    for stage in stages:
        image = stage[0][1].split()[0]
        assert image == "python:3.11-slim", image

    env = " ".join(_final("ENV"))
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=67108864" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert _final("EXPOSE") == ["50051"]
    [user] = _final("USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert [json.loads(a) for a in _final("ENTRYPOINT")] == [["patchwire"]]
    # a folder the unprivileged user owns, for --state-dir on a named volume (which takes its owner)
    assert any("install -d -o 10001 -g 10001" in args and "/state" in args for args in _final("RUN"))
    assert [json.loads(a) for a in _final("CMD")] == [
        ["serve", "--host", "0.0.0.0", "--port", "50051", "--dataset", "phantom=/data/phantom-v1.h5"]
    ]


def _healthcheck_argv() -> list[str]:
    [args] = _final("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", args)
    assert match, f"HEALTHCHECK should use the exec form: {args}"
    argv = json.loads(match.group(1))
    assert argv[:2] == ["python", "-c"]
    return [sys.executable, *argv[1:]]


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"127.0.0.1:{port}", servicer
        finally:
            server.stop(None).wait()


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [(health_pb2.HealthCheckResponse.SERVING, 0), (health_pb2.HealthCheckResponse.NOT_SERVING, 1)],
)
def test_healthcheck_command_follows_health_service(
    health_server: tuple[str, health.HealthServicer], tmp_path: Path, status: int, exit_code: int
) -> None:
    target, servicer = health_server
    servicer.set("", status)
    proc = subprocess.run(
        _healthcheck_argv(),
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path, PATCHWIRE_HEALTH_TARGET=target),
        timeout=60,
    )
    assert proc.returncode == exit_code, proc.stderr


def test_healthcheck_command_speaks_tls_when_given_a_ca(tmp_path: Path) -> None:
    from patchwire.service._certs import make_dev_certs

    certs = make_dev_certs(tmp_path / "certs")
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        credentials = grpc.ssl_server_credentials(
            [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
            root_certificates=certs.ca_cert.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        try:
            target = {"PATCHWIRE_HEALTH_TARGET": f"127.0.0.1:{port}"}
            mtls = {
                "PATCHWIRE_HEALTH_CA": str(certs.ca_cert),
                "PATCHWIRE_HEALTH_CERT": str(certs.client_cert),
                "PATCHWIRE_HEALTH_KEY": str(certs.client_key),
            }
            for extra, exit_code in (({}, 1), ({"PATCHWIRE_HEALTH_CA": str(certs.ca_cert)}, 1), (mtls, 0)):
                proc = subprocess.run(
                    _healthcheck_argv(),
                    capture_output=True,
                    text=True,
                    env=_clean_env(tmp_path, **target, **extra),
                    timeout=60,
                )
                assert proc.returncode == exit_code, (extra, proc.stderr)
        finally:
            server.stop(None).wait()


def test_healthcheck_command_fails_without_server(tmp_path: Path) -> None:
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
        server = grpc.server(pool)
        port = server.add_insecure_port("127.0.0.1:0")  # reserve a port, then leave it closed
        server.stop(None)
    proc = subprocess.run(
        _healthcheck_argv(),
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path, PATCHWIRE_HEALTH_TARGET=f"127.0.0.1:{port}"),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
