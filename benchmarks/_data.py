"""The benchmark file: the package's phantom dataset maker at the run's size, generated once (cached in
``$PATCHWIRE_HOME`` for the full run) and read through once so the page cache is warm."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from _plan import DATA_VERSION, FULL, Mode

from patchwire.service._phantom import make_phantom_dataset


def dataset_path(mode: Mode, out: Path) -> Path:
    z, y, x = mode.shape
    name = f"bench-phantom-{DATA_VERSION}-{mode.subjects}x{z}x{y}x{x}.h5"
    home = os.environ.get("PATCHWIRE_HOME")
    folder = Path(home) if home and mode.name == FULL.name else out
    return folder / name


def ensure_dataset(mode: Mode, out: Path) -> tuple[Path, float | None]:
    """The benchmark file (generated on first use, written to a temporary name and renamed into place); returns it
    and the seconds generation took (None when it was cached)."""
    path = dataset_path(mode, out)
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".h5.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        make_phantom_dataset(tmp_path, subjects=mode.subjects, shape=mode.shape)
        tmp_path.replace(path)
        os.sync()  # write the new file back now, not while the first sections are being timed
    finally:
        tmp_path.unlink(missing_ok=True)
    return path, time.perf_counter() - start


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
