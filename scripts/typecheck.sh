#!/usr/bin/env bash
# Type-checks patchwire with mypy. The import names (patchwire.service, ...) differ from the folder names
# (service/, ...), so mypy reads the packages through a folder of symlinks laid out by import name.
set -euo pipefail
cd "$(dirname "$0")/.."
view=.tools/typecheck/patchwire
rm -rf .tools/typecheck && mkdir -p "$view"
ln -s "$PWD/service" "$view/service"
ln -s "$PWD/client" "$view/client"
ln -s "$PWD/wire" "$view/wire"
ln -s "$PWD/cli" "$view/cli"
ln -s "$PWD/protos/patchwire/v1" "$view/v1"
MYPYPATH=.tools/typecheck .venv/bin/mypy --namespace-packages --explicit-package-bases \
  -p patchwire.service -p patchwire.client -p patchwire.wire -p patchwire.cli "$@"
