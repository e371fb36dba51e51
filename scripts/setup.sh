#!/usr/bin/env bash
# Creates .venv with everything patchwire needs (server, torch and TensorFlow clients, tests, dev tools).
# Idempotent: re-running only installs what changed. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this version has a CPU build available locally; a looser spec may pull a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[server,torch,tensorflow,test,dev]"
# buf (protobuf linter) comes from npm into .tools/
if command -v npm >/dev/null 2>&1 && [ ! -x .tools/node_modules/.bin/buf ]; then
  mkdir -p .tools
  (cd .tools && npm install --silent --no-audit --no-fund --prefix . @bufbuild/buf@1 >/dev/null)
fi
echo "patchwire environment ready in .venv"
