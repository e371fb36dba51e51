"""Assembled subjects as files: NIfTI or MHA with the subject's original geometry (SimpleITK), or a one-subject
HDF5 dataset in pymia's format.

NIfTI/MHA: one entry per file; a single channel is written as a scalar image, several channels as a vector image.
HDF5: the job's first entry becomes category ``images`` (the category pymia's readers index, so
``PymiaDatasource`` and ``patchwire serve`` can read the predictions back), further entries keep their names;
channel ``c`` of entry ``e`` is named ``e_c`` (``prediction_c`` for an unnamed array prediction).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchwire.service._errors import FailedPrecondition, InvalidArgument, NotFound, bounded
from patchwire.service._pymia_format import SubjectRecord, write_pymia_dataset
from patchwire.service.assembly.results import result
from patchwire.v1 import assembly_service_pb2 as apb

if TYPE_CHECKING:
    from patchwire.service.assembly.job import Job

__all__ = ["export_subject"]

_PREDICTION = "__prediction"
_SUFFIX: dict[int, str] = {
    apb.EXPORT_FORMAT_NIFTI: ".nii.gz",
    apb.EXPORT_FORMAT_MHA: ".mha",
    apb.EXPORT_FORMAT_HDF5: ".h5",
}


def _label(entry: str) -> str:
    return "prediction" if entry == _PREDICTION else entry


def export_subject(job: Job, subject_index: int, fmt: int, entry: str) -> tuple[str, bytes]:
    """Returns (file name, file bytes) of an assembled subject."""
    if fmt not in _SUFFIX:
        raise InvalidArgument(f"format: choose EXPORT_FORMAT_NIFTI, _MHA or _HDF5, got {fmt}")
    results = result(job, subject_index)
    subject = job.subject(subject_index)
    geometry = job.source.dataset.require_geometry(subject_index)
    with tempfile.TemporaryDirectory(prefix="patchwire-export-") as tmp:
        if fmt == apb.EXPORT_FORMAT_HDF5:
            name = f"{job.id}_{subject.name}{_SUFFIX[fmt]}"
            categories: dict[str, dict[str, np.ndarray]] = {}
            for k, (key, arr) in enumerate(results.items()):
                label = _label(key)
                categories["images" if k == 0 else label] = {
                    f"{label}_{c}": np.asarray(arr[..., c]) for c in range(arr.shape[-1])
                }
            if len(categories) != len(results):
                raise FailedPrecondition("an entry named 'images' clashes with the first entry stored as 'images'")
            write_pymia_dataset(
                Path(tmp) / name,
                [
                    SubjectRecord(
                        subject.name,
                        categories,
                        geometry,
                    )
                ],
            )
            return name, (Path(tmp) / name).read_bytes()
        import SimpleITK as sitk

        if not entry:
            if len(results) != 1:
                raise InvalidArgument(
                    f"entry: the job has several entries ({', '.join(map(_label, results))}); name the one to export"
                )
            entry = next(iter(results))
        key = _PREDICTION if entry == "prediction" and _PREDICTION in results else entry
        if key not in results:
            raise NotFound(
                f"entry: job {job.id!r} has no entry {bounded(entry)} (entries: {', '.join(map(_label, results))})"
            )
        arr = np.asarray(results[key])
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)  # ITK has no half floats
        image = sitk.GetImageFromArray(arr[..., 0] if arr.shape[-1] == 1 else arr, isVector=arr.shape[-1] > 1)
        image.SetOrigin(geometry.origin)
        image.SetSpacing(geometry.spacing)
        image.SetDirection(geometry.direction)
        name = f"{job.id}_{subject.name}_{_label(key)}{_SUFFIX[fmt]}"
        sitk.WriteImage(image, str(Path(tmp) / name), useCompression=fmt == apb.EXPORT_FORMAT_NIFTI)
        return name, (Path(tmp) / name).read_bytes()
