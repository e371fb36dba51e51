"""What a benchmark run measures: its mode (data size, time budgets, repetitions), the streaming patterns, the
assemblers compared, the performance targets and the constants every section shares."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _pymia import load_pymia

from patchwire.client import extraction as pw_extr

HERE = Path(__file__).resolve().parent
BATCH_SIZE = 16
DATASET = "bench"
CATEGORIES = ("images", "labels")
PREDICTION_KEY = "__prediction"  # pymia's key for a plain-array prediction (patchwire keeps it)
MB = 1e6
CEILING_METHOD = "/patchwire.bench.Ceiling/Stream"
CEILING_MESSAGE_BYTES = 1 << 20
DATA_VERSION = "v1"  # bump when the phantom generator's output changes


@dataclass(frozen=True)
class Mode:
    """What one run measures and how long."""

    name: str
    subjects: int
    shape: tuple[int, int, int]
    patch: int
    budget_s: float
    """Wall-clock budget per streaming pattern and loader (several epochs when one is shorter), after the warm-up."""
    warmup_s: float
    """Most time a loader warms up (its first epoch, or until this many seconds when the epoch is longer): caches
    filled, copies built, workers started. Throughput counts from there; the time to first batch is the warm-up's."""
    max_samples: int
    """Stop a pattern after this many samples even inside its budget."""
    ceiling_messages: int
    ceiling_runs: int
    assembly_runs: int
    """Runs of each assembler per case, interleaved (patchwire's three, then pymia, again): the median counts."""


FULL = Mode("full", 8, (181, 217, 181), 64, 10.0, 2.0, 200_000, 1024, 5, 5)
SMOKE = Mode("smoke", 2, (24, 40, 36), 16, 0.3, 0.1, 2_000, 64, 3, 1)

# The performance targets, as (ratio or bound).
#: patchwire's assembly runs: name -> (label, server, the assembler's shared_memory). Servers: "durable" has a state
#: folder (journalled, fsync'ed), "in_memory" none (jobs in memory, like pymia's).
ASSEMBLERS: dict[str, tuple[str, str, bool | None]] = {
    "patchwire": ("patchwire, state dir", "durable", None),
    "patchwire_in_memory": ("patchwire, in memory", "in_memory", None),
    "patchwire_in_memory_wire": ("patchwire, in memory, wire", "in_memory", False),
}
#: Unacknowledged prediction batches patchwire's assembler may have in flight (RemoteSubjectAssembler window).
ASSEMBLY_WINDOW = 8
#: Stand-in training steps per batch for the prefetch measurement, by pattern: about as long as receiving a batch.
TRAINING_STEP_MS = {"axial": 4.0, "patches": 30.0}
#: Size of one durable append in the disk measurement: about one batch of 16 axial slice predictions.
DISK_APPEND_BYTES = 4 << 20
TARGET_VS_CEILING = 0.7
TARGET_AXIAL_VS_PYMIA_W2 = 1.0
TARGET_AXIS2_VS_PYMIA = 10.0
TARGET_PATCH_VS_PYMIA = 1.5
TARGET_ASSEMBLY_VS_PYMIA = 1.0
TARGET_SEED_LOOP_VS_PYMIA = 1.0  # the drop-in: pymia's loop, only the construction lines changed
TARGET_TTFB_MS = 150.0
TARGET_SERVER_RSS_MB = 400.0  # + the server's configured block cache


@dataclass(frozen=True)
class Pattern:
    key: str
    label: str
    kind: str  # "slice" | "patch"
    axis: int = 0
    patch: int = 0

    def patchwire_indexing(self) -> pw_extr.IndexingStrategy:
        if self.kind == "slice":
            return pw_extr.SliceIndexing(self.axis)
        return pw_extr.PatchWiseIndexing((self.patch,) * 3)

    def pymia_indexing(self) -> Any:
        extraction = load_pymia().extraction
        if self.kind == "slice":
            return extraction.SliceIndexing(self.axis)
        return extraction.PatchWiseIndexing((self.patch,) * 3)


def patterns(mode: Mode) -> list[Pattern]:
    p = mode.patch
    return [
        Pattern("axial", "axial slices (axis 0)", "slice", axis=0),
        Pattern("axis2", "axis-2 slices", "slice", axis=2),
        Pattern("patches", f"{p}^3 patches", "patch", patch=p),
    ]


def progress(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"  .. {message}", file=sys.stderr, flush=True)
