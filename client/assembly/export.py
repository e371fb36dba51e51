"""Exporting an assembled subject to a file (NIfTI, MHA or pymia's HDF5 format, told by the file's suffix): streamed
into a hidden partial file under the retry policy, renamed into place only once complete."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from patchwire.client._connection import Connection
from patchwire.client._errors import ProtocolError, translate_rpc_errors
from patchwire.client._retry import RetryPolicy, call_with_retries
from patchwire.v1 import assembly_service_pb2 as apb

__all__ = ["FORMATS", "export_subject"]

FORMATS = {
    ".nii": apb.EXPORT_FORMAT_NIFTI,
    ".nii.gz": apb.EXPORT_FORMAT_NIFTI,
    ".mha": apb.EXPORT_FORMAT_MHA,
    ".h5": apb.EXPORT_FORMAT_HDF5,
    ".hdf5": apb.EXPORT_FORMAT_HDF5,
}


def export_subject(
    connection: Connection,
    retry: RetryPolicy,
    job: Callable[[], str],
    subject_index: int,
    path: str | Path,
    entry: str | None,
    what: str,
) -> Path:
    """Writes subject ``subject_index`` of the job ``job()`` names to ``path`` (``what``: the call, for errors)."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the format of {path.name!r}: use {', '.join(FORMATS)}")
    request = apb.ExportSubjectRequest(
        job_id=job(), subject_index=int(subject_index), format=FORMATS[suffix], entry=entry or ""
    )
    tmp = path.with_name(f".{path.name}.part")

    def write() -> int | None:  # (a retry writes the file from its start)
        size = None
        with translate_rpc_errors(what), open(tmp, "wb") as f:
            for response in connection.assembly.ExportSubject(request):
                if response.WhichOneof("payload") == "file":
                    size = response.file.size
                else:
                    f.write(response.data)
        return size

    try:
        size = call_with_retries(retry, connection.address, what, write, read=True)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a refused or broken export leaves no partial file behind
        raise
    if size is None or tmp.stat().st_size != size:
        tmp.unlink(missing_ok=True)
        raise ProtocolError(
            f"export of subject {subject_index} ended early: the server sent fewer bytes than it announced"
        )
    tmp.replace(path)
    return path
