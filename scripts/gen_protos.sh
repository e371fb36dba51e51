#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC stubs and their typed stubs from protos/patchwire/v1/*.proto.
# Usage: scripts/gen_protos.sh [--check]   (--check fails when the committed stubs are stale)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
# an absolute interpreter path: --check runs protoc from a temporary folder
case "$py" in */*) py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") ;; esac
# the mypy-protobuf plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) live beside the interpreter
PATH="$(dirname "$(command -v "$py")"):$PATH"
out=protos/patchwire/v1
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  cp -r protos "$tmp/"
  (cd "$tmp" && "$py" -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos \
     --mypy_out=protos --mypy_grpc_out=protos protos/patchwire/v1/*.proto)
  if ! diff -r -q "$out" "$tmp/$out" >/dev/null; then
    diff -r "$out" "$tmp/$out" | head -40
    echo "generated stubs are stale: run scripts/gen_protos.sh and commit the result" >&2
    exit 1
  fi
  echo "generated stubs are up to date"
  exit 0
fi
"$py" -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos \
  --mypy_out=protos --mypy_grpc_out=protos protos/patchwire/v1/*.proto
echo "regenerated stubs in $out"
