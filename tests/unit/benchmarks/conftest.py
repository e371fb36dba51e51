"""The benchmark's modules import each other as top-level modules (``benchmarks/`` is their script folder), so
their tests put that folder first on ``sys.path``."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
