"""Packaging: a server install pulls neither torch nor TensorFlow, the wheel holds the three packages and their
stubs, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_server_install_has_no_ml_frameworks() -> None:
    project = _pyproject()["project"]
    server = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    assert not [d for d in server if re.match(r"(torch|tensorflow)", d, re.IGNORECASE)]
    assert any(d.startswith("h5py") for d in project["optional-dependencies"]["server"])
    assert any(d.startswith("uvloop") for d in project["optional-dependencies"]["server"])
    assert not any(d.startswith(("h5py", "uvloop")) for d in project["dependencies"])


def test_server_and_client_import_without_torch_or_tensorflow() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['tensorflow'] = None\n"
        "import patchwire.service, patchwire.cli, patchwire.cli.serve, patchwire.client, patchwire.client.extraction\n"
        "import patchwire.client.transformation\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_wheel_contents(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("patchwire-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "patchwire/service/__init__.py",
        "patchwire/service/py.typed",
        "patchwire/client/__init__.py",
        "patchwire/client/py.typed",
        "patchwire/v1/dataset_service_pb2.py",
        "patchwire/v1/dataset_service_pb2_grpc.py",
        "patchwire/v1/dataset_service_pb2.pyi",
        "patchwire/v1/dataset_service.proto",
        "patchwire/wire/framing.py",
        "patchwire/wire/py.typed",
        "patchwire/cli/__init__.py",
        "patchwire/cli/__main__.py",
        "patchwire/cli/py.typed",
        "patchwire/v1/py.typed",
    ):
        assert required in names, required
    assert not [n for n in names if n.startswith(("tests/", "patchwire/__init__.py"))]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in readme and "exec scripts/test.sh" in ci
    assert "scripts/demo.sh" in readme
