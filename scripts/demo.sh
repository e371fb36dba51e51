#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs `patchwire demo`: the seed pipeline end to end against a real server
# on the built-in phantom dataset. Extra arguments go to `patchwire demo` (see `patchwire demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/patchwire demo "$@"
