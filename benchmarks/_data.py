"""The benchmark files, generated once (cached in ``$PATCHWIRE_HOME`` for the full run) and read through once so
the page cache is warm: the package's phantom at the run's size, and a skull-stripped variant of it for the link
section (``benchmarks/_link.py``).

The phantom's background is not zero: air and scalp hold magnitude noise (about 130 on its 0-1000 scale), as raw
scans do, and nothing in it compresses. Skull-stripped scans, which most segmentation pipelines train on, are zero
outside the brain, and that is what compression of images can gain from; the variant keeps the phantom's
intensities (smooth tissue contrast, bias field, noise) and labels inside a brain mask and sets everything outside
it to exactly zero, so its ratio is what such scans give, not what constant regions would."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from _plan import DATA_VERSION, FULL, Mode
from scipy import ndimage

from patchwire.service._phantom import LazySubjects, make_phantom_dataset, make_phantom_subject
from patchwire.service._pymia_format import SubjectRecord, write_pymia_dataset
from patchwire.wire import definition as defs

SKULL_STRIPPED_VERSION = "v1"  # bump when the skull-stripped variant's output changes
#: How far (voxels, 6-connected steps) the brain mask reaches beyond the labelled tissue: the CSF between cortex and
#: skull that skull-stripping masks keep. The mask is then 20% of the phantom's 181x217x181 volume, its zero
#: background 80%; an adult brain with its CSF (1.5-1.8 litres) fills a fifth to a quarter of a 1 mm MNI-space
#: volume of that size, so skull-stripped scans there are zero on 75-80% of their voxels.
MASK_MARGIN_VOXELS = 5


def dataset_path(mode: Mode, out: Path, skull_stripped: bool = False) -> Path:
    z, y, x = mode.shape
    kind = f"skull-stripped-{SKULL_STRIPPED_VERSION}" if skull_stripped else f"phantom-{DATA_VERSION}"
    name = f"bench-{kind}-{mode.subjects}x{z}x{y}x{x}.h5"
    home = os.environ.get("PATCHWIRE_HOME")
    folder = Path(home) if home and mode.name == FULL.name else out
    return folder / name


def ensure_dataset(mode: Mode, out: Path, skull_stripped: bool = False) -> tuple[Path, float | None]:
    """The benchmark file, the phantom or (``skull_stripped``) its skull-stripped variant (generated on first use,
    written to a temporary name and renamed into place); returns it and the seconds generation took (None when it
    was cached)."""
    path = dataset_path(mode, out, skull_stripped)
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".h5.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        if skull_stripped:
            # the skull-stripped phantom subjects, made on access (one in memory at a time)
            subjects = LazySubjects(mode.subjects, lambda index: skull_strip(make_phantom_subject(index, mode.shape)))
            write_pymia_dataset(tmp_path, subjects)
        else:
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


def skull_strip(record: SubjectRecord) -> SubjectRecord:
    """``record`` (a phantom subject) as a skull-stripped scan: every image entry exactly zero outside a brain mask
    (the labelled tissue grown by :data:`MASK_MARGIN_VOXELS`, holes such as the ventricles filled), unchanged
    inside it (float32 tissue intensities with the phantom's bias field and noise); labels are unchanged (they are
    zero outside the brain already)."""
    labels = record.categories["labels"]["GT"]
    mask = ndimage.binary_fill_holes(ndimage.binary_dilation(labels > 0, iterations=MASK_MARGIN_VOXELS))
    images = {name: np.where(mask, image, image.dtype.type(0)) for name, image in record.categories["images"].items()}
    return SubjectRecord(record.name, {**record.categories, "images": images}, record.geometry, record.files)


def zero_fractions(path: Path) -> dict[str, Any]:
    """What share of a pymia-format file's image values are exactly zero, and of its voxels labelled (non-zero
    labels): the background that compression of images can gain from."""
    zeros = values = labelled = voxels = 0
    with h5py.File(path, "r") as h5:
        count = len(h5[defs.LOC_SUBJECT])
        for i in range(count):
            key = defs.subject_index_to_str(i, count)
            images = h5[defs.LOC_DATA_PLACEHOLDER.format("images")][key][()]
            zeros += int(np.count_nonzero(images == 0))
            values += images.size
            labels = h5[defs.LOC_DATA_PLACEHOLDER.format("labels")][key][()]
            labelled += int(np.count_nonzero(labels))
            voxels += labels.size
    return {"image_zero_fraction": zeros / values, "labelled_fraction": labelled / voxels}
