#!/usr/bin/env bash
# The long soak: streaming and posting clients against one `patchwire serve` for SECONDS (default 300), then the
# figures (samples/s, volumes, server RSS at start, after warm-up and at the end). Extra arguments go to pytest.
#   scripts/soak.sh            # 5 minutes
#   scripts/soak.sh 900 -x     # 15 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-300}"
shift || true
export PATCHWIRE_SOAK_S="$seconds"
export PATCHWIRE_SOAK_REPORT="${PATCHWIRE_SOAK_REPORT:-${TMPDIR:-/tmp}/patchwire-soak.json}"
.venv/bin/python -m pytest -q -s -m soak tests/integration/test_soak.py -p no:cacheprovider "$@"
echo "report: $PATCHWIRE_SOAK_REPORT"
