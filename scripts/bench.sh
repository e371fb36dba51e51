#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the benchmark: gRPC ceiling, patchwire streaming, pymia 0.3.4 locally,
# assembly, time to first batch and peak RSS, with the table printed and bench.json / bench.png written.
# Arguments go to benchmarks/bench.py, e.g. scripts/bench.sh --smoke --out /tmp/bench (default out: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python benchmarks/bench.py "$@"
