"""Tiny pymia-format datasets built with pymia 0.3.4's own creation API (the oracle), with fixed seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from _pymia_oracle import load_pymia


def _images(rng: np.random.Generator, shape: tuple[int, int, int], index: int) -> dict[str, sitk.Image]:
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    t1 = (rng.normal(100.0, 20.0, size=shape) + 3.0 * zz).astype(np.float32)
    t2 = (rng.normal(50.0, 10.0, size=shape) - 2.0 * xx).astype(np.float32)
    cz, cy, cx = (z - 1) / 2, (y - 1) / 2, (x - 1) / 2
    r = np.sqrt(((zz - cz) / max(cz, 1)) ** 2 + ((yy - cy) / max(cy, 1)) ** 2 + ((xx - cx) / max(cx, 1)) ** 2)
    gt = np.zeros(shape, dtype=np.uint8)
    gt[r < 0.8] = 1
    gt[r < 0.4] = 2
    gt[rng.random(shape) < 0.02] = 3
    mask = (r < 0.9).astype(np.uint8)
    out = {}
    for key, arr in (("T1", t1), ("T2", t2), ("GT", gt), ("MASK", mask)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.9 + 0.1 * index, 1.1, 2.5))
        img.SetOrigin((-10.0 * index, 12.5, -3.25))
        img.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        out[key] = img
    return out


def make_pymia_dataset(
    directory: Path,
    subjects: int = 3,
    shape: tuple[int, int, int] = (20, 24, 16),
    vary_shape: bool = False,
    seed: int = 42,
) -> Path:
    """Writes ``directory/dataset.h5`` with categories images (T1, T2 float32), labels (GT uint8) and mask
    (MASK uint8); with ``vary_shape`` subject i has ``shape[0] + 2 * i`` slices along axis 0."""
    pymia = load_pymia()
    rng = np.random.default_rng(seed)
    subject_files = []
    for i in range(subjects):
        name = f"Subject_{i + 1}"
        sdir = directory / name
        sdir.mkdir(parents=True)
        s = (shape[0] + 2 * i, *shape[1:]) if vary_shape else shape
        paths = {}
        for key, img in _images(rng, s, i).items():
            paths[key] = str(sdir / f"{name}_{key}.mha")
            sitk.WriteImage(img, paths[key])
        subject_files.append(
            pymia.data.SubjectFile(
                name,
                images={"T1": paths["T1"], "T2": paths["T2"]},
                labels={"GT": paths["GT"]},
                mask={"MASK": paths["MASK"]},
            )
        )
    out = directory / "dataset.h5"
    with pymia.creation.get_writer(str(out)) as writer:
        pymia.creation.Traverser().traverse(
            subject_files, load=pymia.creation.LoadDefault(), callback=pymia.creation.get_default_callbacks(writer)
        )
    return out


def write_arrays_dataset(path: Path, subjects: list[dict[str, dict[str, np.ndarray]]]) -> Path:
    """A pymia-format file written by patchwire's writer from arrays: subject ``S{i}`` gets ``subjects[i]``
    (category -> entry name -> (z, y, x) array), unit spacing at the origin."""
    from patchwire.service._pymia_format import SubjectRecord, write_pymia_dataset
    from patchwire.wire.geometry import ImageProperties

    records = []
    for i, categories in enumerate(subjects):
        shape = next(iter(next(iter(categories.values())).values())).shape[:3]
        geometry = ImageProperties(shape[::-1], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        records.append(SubjectRecord(name=f"S{i}", categories=categories, geometry=geometry))
    write_pymia_dataset(path, records)
    return path
