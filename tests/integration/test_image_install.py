"""The server image's install steps, run in a clean virtual environment instead of a container: the files its build
stage copies, its wheel, a fresh venv holding that wheel with the extras its Dockerfile names, then the image's own
config file (its paths moved into a temporary folder) served from that venv and probed by the image's health check.

It catches what the repository's own environment hides: a dependency the server imports but the ``server`` extra
does not declare, a file the wheel leaves out, a torch or TensorFlow import creeping into the server. Packages come
from the package index (pip's cache keeps a rerun quick).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from patchwire.cli.launch import launched
from patchwire.service._certs import make_dev_certs
from patchwire.service._phantom import make_phantom_dataset

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONFIG = REPO / "docker" / "patchwire.toml"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
INSTALL_TIMEOUT_S = 900
"""A bound for a download that hangs, never a pace."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_TIMEOUT_S + 120)]


def _build_stage() -> list[tuple[str, str]]:
    """The first stage's instructions (KEYWORD, arguments), continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM" and instructions:
            break
        instructions.append((keyword.upper(), args))
    return instructions


def _run(
    *command: str | Path,
    timeout: float = INSTALL_TIMEOUT_S,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Runs ``command``; returns its stdout, failing the test with its output when it fails."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the server image's install: the build stage's sources, its wheel, its extras."""
    stage = _build_stage()
    src = tmp_path_factory.mktemp("src")
    for keyword, args in stage:
        if keyword == "COPY":
            *sources, _ = args.split()
            for source in sources:
                origin = REPO / source
                if origin.is_dir():
                    shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(origin, src / source)
    [install] = [args for keyword, args in stage if keyword == "RUN" and "pip install" in args]
    [extras] = re.findall(r'"\$\{whl\}\[([a-z,]+)\]"', install)
    assert "pip wheel --no-deps --wheel-dir /wheels ." in install

    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    wheels = tmp_path_factory.mktemp("wheels")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", wheels, ".", cwd=src, env=env)
    [wheel] = wheels.glob("patchwire-*.whl")
    venv = tmp_path_factory.mktemp("venv") / "opt-venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[{extras}]", env=env)
    return venv


def test_server_install_has_neither_torch_nor_tensorflow(server_venv: Path) -> None:
    python = server_venv / "bin" / "python"
    found = _run(
        python,
        "-c",
        "import importlib.util, json; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('torch', 'tensorflow', 'keras', 'jax', 'h5py', 'grpc_health', 'patchwire.service')}))",
        cwd=server_venv,  # not the repository: its folders must not shadow the installed package
    )
    assert json.loads(found) == {
        "torch": False, "tensorflow": False, "keras": False, "jax": False,
        "h5py": True, "grpc_health": True, "patchwire.service": True,
    }  # fmt: skip
    installed = json.loads(_run(python, "-m", "pip", "list", "--format", "json"))
    names = {p["name"].lower() for p in installed}
    assert not {n for n in names if n.startswith(("torch", "tensorflow", "nvidia-"))}, names


def test_server_commands_run_from_the_install(server_venv: Path) -> None:
    patchwire = server_venv / "bin" / "patchwire"
    help_text = _run(patchwire, "serve", "--help", timeout=60, cwd=server_venv)
    for flag in ("--config", "--workers", "--replica-id", "--metrics-port"):
        assert flag in help_text, flag
    effective = _run(patchwire, "config", "check", CONFIG, timeout=60, cwd=server_venv, env=_plain_env())
    assert f"# patchwire serve settings: {CONFIG}" in effective


def _plain_env(**extra: str) -> dict[str, str]:
    """This environment less its PATCHWIRE_* variables (they would override the file), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PATCHWIRE_")}, **extra}


def test_image_config_serves_from_the_install_and_answers_health(server_venv: Path, tmp_path: Path) -> None:
    """docker/patchwire.toml with /data, /state and /run/secrets moved under ``tmp_path`` (datasets: small phantoms,
    secrets: a development set), served by the venv's ``patchwire`` on a free port as the image's command does, and
    probed by the image's health check with the venv's python, over TLS."""
    text = CONFIG.read_text()
    config = tomllib.loads(text)
    moved = {"/data/": f"{tmp_path}/data/", "/state": f"{tmp_path}/state", "/run/secrets/": f"{tmp_path}/secrets/"}
    for old, new in moved.items():
        text = text.replace(f'"{old}', f'"{new}')
    local = tomllib.loads(text)
    for name, path in local["datasets"].items():
        assert Path(path).is_relative_to(tmp_path), (name, path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        make_phantom_dataset(path, subjects=1, shape=(16, 20, 16))
    certs = make_dev_certs(tmp_path / "secrets")
    for key in ("tls_cert", "tls_key", "auth_config"):
        assert Path(local[key]).is_file(), f"{key} = {config[key]!r}: not a file of the development set"
    Path(local["state_dir"]).mkdir()
    moved_config = tmp_path / "patchwire.toml"
    moved_config.write_text(text)

    command = [str(server_venv / "bin" / "patchwire"), "serve", "--config", str(moved_config)]
    command += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]  # the rest as configured
    env = _plain_env(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=67108864")
    with launched(command, env=env) as server:
        probe = subprocess.run(
            [str(server_venv / "bin" / "python"), str(HEALTHCHECK)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_plain_env(PATCHWIRE_HEALTH_TARGET=server.address, PATCHWIRE_HEALTH_CA=str(certs.ca_cert)),
        )
        assert probe.returncode == 0, probe.stderr
        plaintext = subprocess.run(
            [str(server_venv / "bin" / "python"), str(HEALTHCHECK)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_plain_env(PATCHWIRE_HEALTH_TARGET=server.address, PATCHWIRE_HEALTH_TIMEOUT="2"),
        )
        assert plaintext.returncode == 1, "the config serves TLS only"
