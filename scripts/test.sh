#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs every check: generated stubs up to date, buf lint, ruff, mypy, tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== generated stubs"
PYTHON=.venv/bin/python scripts/gen_protos.sh --check
echo "== buf lint"
if [ ! -x .tools/node_modules/.bin/buf ]; then
  echo "buf is missing: scripts/setup.sh installs it from npm (install Node.js/npm first)" >&2
  exit 1
fi
(cd protos && ../.tools/node_modules/.bin/buf lint)
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
scripts/typecheck.sh
echo "== pytest"
.venv/bin/python -m pytest "$@"
