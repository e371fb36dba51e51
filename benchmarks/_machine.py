"""The machine and its processes as the report shows them: CPU, memory and library versions, and a process's peak
resident set (Linux ``/proc``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from _plan import MB


def _kb(path: str, field: str) -> int | None:
    """A ``FIELD: N kB`` line of a ``/proc`` file, or None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident set) of a process in MB, or None where /proc has no such field."""
    kb = _kb(f"/proc/{pid}/status", "VmHWM")
    return None if kb is None else kb * 1024 / MB


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Resets a process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = _kb("/proc/meminfo", "MemTotal")
    import h5py

    try:
        pymia_version = importlib.metadata.version("pymia")
    except Exception:
        pymia_version = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": None if mem_kb is None else round(mem_kb / (1 << 20), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "h5py": h5py.__version__,
        "pymia": pymia_version,
    }
