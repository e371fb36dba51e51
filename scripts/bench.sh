#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the benchmark: gRPC ceiling, patchwire streaming, pymia 0.3.4 locally,
# assembly, time to first batch and peak RSS, and (as root, with iproute2) the same over a 10 Gbit/s link in a network
# namespace, with the table printed and bench.json / bench.png / link.png written.
# Arguments go to benchmarks/bench.py, e.g. scripts/bench.sh --smoke --out /tmp/bench (default out: benchmarks/results);
# scripts/bench.sh --only link runs the link section alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python benchmarks/bench.py "$@"
