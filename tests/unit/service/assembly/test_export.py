"""Assembled subjects written as files without a server: NIfTI and MHA carry the subject's original geometry and
the assembled values; HDF5 is a one-subject pymia dataset; a wrong entry or format is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from patchwire.service._datasource import DatasourceCache
from patchwire.service._errors import InvalidArgument, NotFound
from patchwire.service.assembly import EntrySpec, Job
from patchwire.service.assembly.export import export_subject
from patchwire.v1 import assembly_service_pb2 as apb

from _assembly_jobs import make_job, resolver, slices, write_dataset

SHAPE = (3, 4, 5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasourceCache]:
    with resolver(write_dataset(tmp_path_factory.mktemp("export"), [SHAPE])) as c:
        yield c


@pytest.fixture
def job(cache: DatasourceCache, tmp_path: Path) -> Job:
    """A finished job with two entries: ``seg`` (one channel, uint8) and ``prob`` (two channels, float16)."""
    entries = [EntrySpec("seg", 1, np.dtype(np.uint8)), EntrySpec("prob", 2, np.dtype(np.float16))]
    job = make_job(cache, slices(0), tmp_path / "job", entries, mode="overwrite")
    seg = (np.arange(np.prod(SHAPE)) % 7).astype(np.uint8).reshape(*SHAPE, 1)
    prob = np.stack([seg[..., 0] / 10, seg[..., 0] / 20], axis=-1).astype(np.float16)
    job.post(list(range(SHAPE[0])), {"seg": list(seg), "prob": list(prob)}, last_batch=False)
    return job


@pytest.mark.parametrize("fmt", [apb.EXPORT_FORMAT_NIFTI, apb.EXPORT_FORMAT_MHA])
def test_images_carry_the_original_geometry(job: Job, tmp_path: Path, fmt: int) -> None:
    import SimpleITK as sitk

    name, data = export_subject(job, 0, fmt, "seg")
    assert name.startswith("job_") and name.endswith(".nii.gz" if fmt == apb.EXPORT_FORMAT_NIFTI else ".mha")
    path = tmp_path / name
    path.write_bytes(data)
    image = sitk.ReadImage(str(path))
    geometry = job.source.dataset.require_geometry(0)
    assert image.GetSize() == geometry.size and image.GetSpacing() == pytest.approx(geometry.spacing)
    assert image.GetOrigin() == pytest.approx(geometry.origin)
    expected = (np.arange(np.prod(SHAPE)) % 7).astype(np.uint8).reshape(SHAPE)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)


def test_half_floats_become_single_and_channels_become_vector_pixels(job: Job, tmp_path: Path) -> None:
    import SimpleITK as sitk

    name, data = export_subject(job, 0, apb.EXPORT_FORMAT_MHA, "prob")
    (tmp_path / name).write_bytes(data)
    image = sitk.ReadImage(str(tmp_path / name))
    assert image.GetNumberOfComponentsPerPixel() == 2
    assert sitk.GetArrayFromImage(image).dtype == np.float32


def test_hdf5_is_a_one_subject_pymia_dataset(job: Job, tmp_path: Path) -> None:
    name, data = export_subject(job, 0, apb.EXPORT_FORMAT_HDF5, "")
    (tmp_path / name).write_bytes(data)
    with h5py.File(tmp_path / name, "r") as f:
        assert set(f["data"]) == {"images", "prob"}
        assert [n.decode() for n in f["meta/names/images_names"][()]] == ["seg_0"]
        assert f["data/images/0"].shape == (*SHAPE, 1)


def test_refusals(job: Job) -> None:
    with pytest.raises(InvalidArgument, match="format: choose"):
        export_subject(job, 0, 99, "seg")
    with pytest.raises(InvalidArgument, match="several entries"):
        export_subject(job, 0, apb.EXPORT_FORMAT_NIFTI, "")
    with pytest.raises(NotFound, match="has no entry 'nope'"):
        export_subject(job, 0, apb.EXPORT_FORMAT_NIFTI, "nope")
