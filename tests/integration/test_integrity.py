"""Integrity of what is served: broken datasets are reported and left out, files that change under a running server
are noticed before their data is sent, and ``--verify`` catches what the file's identity cannot.

Long because each kind of damage (layout, changed file, corrupt block) needs its own file made on disk and a server
watching it."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service import FailedPrecondition
from patchwire.service._cache import BlockCache
from patchwire.service._integrity import ChecksumMismatch, Checksums
from patchwire.service._served import ServedDataset
from patchwire.service._server import SERVICE_NAME, dataset_health_name
from patchwire.wire import framing

from _datasets import write_arrays_dataset
from _servers import serve_process, threaded_server
from _strategies import index_expressions

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RPC_TIMEOUT_S = 30


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
            .status
        )


def _slices(path: Path) -> list[np.ndarray]:
    """Every axial slice of category 'images', in datasource order, read straight from the file."""
    with h5py.File(path, "r") as f:
        n = len(f["meta/subjects"])
        arrays = [f[f"data/images/{i:0{len(str(n))}d}"][()] for i in range(n)]
    return [a[z] for a in arrays for z in range(a.shape[0])]


def _volumes(seed: int, subjects: int = 2, shape: tuple[int, int, int] = (12, 10, 8)) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "images": {
                "T1": rng.normal(size=shape).astype(np.float32),
                "T2": rng.normal(size=shape).astype(np.float32),
            },
            "labels": {"GT": rng.integers(0, 4, size=shape).astype(np.uint8)},
        }
        for _ in range(subjects)
    ]


# -- broken at start ------------------------------------------------------------------------------------------------


def _garbage(path: Path, good: Path) -> str:
    path.write_bytes(b"not an HDF5 file, just bytes" * 10)
    return "cannot open"


def _truncated(path: Path, good: Path) -> str:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "cannot open"


def _not_pymia(path: Path, good: Path) -> str:
    with h5py.File(path, "w") as f:
        f["volume"] = np.zeros((4, 4, 4), np.float32)
    return "not in pymia format"


def _inconsistent_shapes(path: Path, good: Path) -> str:
    shutil.copyfile(good, path)
    with h5py.File(path, "r+") as f:
        f["meta/shapes/images_shapes"][1] = (7, 24, 16, 2)
    return "meta/shapes/images_shapes[1] says (7, 24, 16, 2)"


def _inconsistent_geometry(path: Path, good: Path) -> str:
    shutil.copyfile(good, path)
    with h5py.File(path, "r+") as f:
        f["meta/image_props/shapes"][0] = (16, 24, 99)
    return "meta/image_props/shapes[0] is (16, 24, 99)"


def _missing_subject(path: Path, good: Path) -> str:
    shutil.copyfile(good, path)
    with h5py.File(path, "r+") as f:
        del f["data/labels/2"]
    return "data/labels/2 is missing"


BROKEN = [_garbage, _truncated, _not_pymia, _inconsistent_shapes, _inconsistent_geometry, _missing_subject]


@pytest.mark.parametrize("breaker", BROKEN, ids=lambda f: f.__name__.strip("_"))
def test_a_broken_dataset_is_reported_and_the_good_one_served(
    breaker: object, tiny_h5: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.h5"
    expected_reason = breaker(bad, tiny_h5)  # type: ignore[operator]
    with caplog.at_level(logging.ERROR, logger="patchwire"), threaded_server({"tiny": tiny_h5, "bad": bad}) as handle:
        address = handle.server.address
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("'bad'" in m and expected_reason in m for m in errors), errors
        assert _health(address, "") == SERVING
        assert _health(address, SERVICE_NAME) == SERVING
        assert _health(address, dataset_health_name("tiny")) == SERVING
        assert _health(address, dataset_health_name("bad")) == NOT_SERVING
        with pw.connect(address) as client:
            assert client.datasets() == ["tiny"]
            unavailable = client.unavailable_datasets()
            assert list(unavailable) == ["bad"] and expected_reason in unavailable["bad"]
            with pytest.raises(pw.InvalidArgumentError, match="dataset 'bad' is unavailable") as raised:
                client.describe("bad")
            assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert expected_reason in raised.value.details
            with pytest.raises(pw.InvalidArgumentError, match="dataset 'bad' is unavailable"):
                client.datasource("bad", extr.SliceIndexing(), extr.DataExtractor(("images",)))
            ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(("images",)))
            try:
                expected = _slices(tiny_h5)
                assert len(ds) == len(expected)
                for i in (0, 17, len(expected) - 1):
                    np.testing.assert_array_equal(ds[i]["images"], expected[i])
            finally:
                ds.close()


def test_serve_command_starts_with_one_good_dataset_and_lists_the_broken_one(tiny_h5: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    with serve_process({"tiny": tiny_h5, "bad": bad}, ("--verify",)) as (proc, address):
        with pw.connect(address, timeout=RPC_TIMEOUT_S) as client:
            assert client.datasets() == ["tiny"]
            assert "cannot open" in client.unavailable_datasets()["bad"]
        proc.terminate()
        assert proc.wait(timeout=RPC_TIMEOUT_S) == 0
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert "ERROR patchwire.service._served: dataset 'bad' is not served" in stderr
    assert "Traceback" not in stderr


# -- changed under a running server ---------------------------------------------------------------------------------


@pytest.fixture
def served_copy(tiny_h5: Path, tmp_path: Path) -> Iterator[tuple[Path, object]]:
    path = tmp_path / "copy.h5"
    shutil.copyfile(tiny_h5, path)
    with threaded_server({"copy": path, "other": tiny_h5}) as handle:
        yield path, handle


def test_a_file_truncated_under_a_running_server_is_never_served(
    served_copy: tuple[Path, object], tiny_h5: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, handle = served_copy
    address = handle.server.address  # type: ignore[attr-defined]
    expected = _slices(tiny_h5)
    with pw.connect(address) as client:
        ds = client.datasource("copy", extr.SliceIndexing(), extr.DataExtractor(("images",)))
        try:
            for i in range(0, len(expected), 7):  # every block of the file in the cache
                np.testing.assert_array_equal(ds[i]["images"], expected[i])
            os.truncate(path, path.stat().st_size // 2)
            with caplog.at_level(logging.ERROR, logger="patchwire"):
                for i in range(len(expected)):
                    with pytest.raises(pw.InvalidArgumentError, match="dataset 'copy'") as raised:
                        ds[i]
                    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert any("'copy' is not served" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        finally:
            ds.close()
        assert "copy" in client.unavailable_datasets()
        assert client.datasets() == ["other"]
        assert _health(address, dataset_health_name("copy")) == NOT_SERVING
        assert _health(address, dataset_health_name("other")) == SERVING
        assert _health(address, "") == SERVING
        server_cache = handle.server.cache  # type: ignore[attr-defined]
        assert not [k for k in server_cache.held() if k[0][0] == "copy"]  # nothing of the old file kept


def test_a_stream_cut_by_a_truncation_sends_only_intact_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(framing, "TARGET_MESSAGE_BYTES", 1)  # one batch per message: the epoch is 400 messages
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(3)
    write_arrays_dataset(path, [{"images": {"T1": rng.normal(size=(400, 128, 128)).astype(np.float32)}}])
    expected = _slices(path)  # 64 KiB each, 25 MiB in all: more than a stream keeps in flight
    with threaded_server({"big": path}) as handle, pw.connect(handle.server.address) as client:
        ds = client.datasource("big", extr.SliceIndexing(), extr.DataExtractor(("images",)))
        received = 0
        try:
            with pytest.raises(pw.InvalidArgumentError, match="dataset 'big'") as raised:
                for batch in ds.batches(batch_size=1, shuffle=True, seed=1):
                    if received == 0:
                        os.truncate(path, path.stat().st_size // 2)
                    for index, image in zip(batch["sample_index"], batch["images"], strict=True):
                        np.testing.assert_array_equal(image, expected[index])  # built before the change: intact
                        received += 1
        finally:
            ds.close()
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert 0 < received < len(expected)


def test_a_file_replaced_by_another_dataset_is_reopened_and_no_stale_block_served(tmp_path: Path) -> None:
    path = tmp_path / "brains.h5"
    write_arrays_dataset(path, _volumes(seed=1))
    first = _slices(path)
    with threaded_server({"brains": path}) as handle, pw.connect(handle.server.address) as client:
        ds = client.datasource("brains", extr.SliceIndexing(), extr.DataExtractor(("images",)))
        try:
            for i in range(len(first)):  # every block cached
                np.testing.assert_array_equal(ds[i]["images"], first[i])
            write_arrays_dataset(path, _volumes(seed=2))  # same name, same layout, new contents (a new inode)
            second = _slices(path)
            assert not np.array_equal(first[0], second[0])
            for i in range(len(second)):
                np.testing.assert_array_equal(ds[i]["images"], second[i])
        finally:
            ds.close()
        generations = {k[0][1] for k in handle.server.cache.held() if k[0][0] == "brains"}
        assert len(generations) == 1  # only the new version's blocks

        # rewritten in place (same inode) with another layout: three subjects of another shape
        other = tmp_path / "other.h5"
        write_arrays_dataset(other, _volumes(seed=3, subjects=3, shape=(9, 10, 8)))
        inode = path.stat().st_ino
        shutil.copyfile(other, path)
        assert path.stat().st_ino == inode
        third = _slices(other)
        assert [s.name for s in client.describe("brains").subjects] == ["S0", "S1", "S2"]
        ds = client.datasource("brains", extr.SliceIndexing(), extr.DataExtractor(("images",)))
        try:
            assert len(ds) == len(third) == 27
            for i in range(len(third)):
                np.testing.assert_array_equal(ds[i]["images"], third[i])
        finally:
            ds.close()
        assert client.datasets() == ["brains"]


def test_a_dataset_that_recovers_is_served_again(tmp_path: Path, tiny_h5: Path) -> None:
    path = tmp_path / "late.h5"
    path.write_bytes(b"still being copied")
    with threaded_server({"late": path, "tiny": tiny_h5}) as handle, pw.connect(handle.server.address) as client:
        assert client.datasets() == ["tiny"]
        shutil.copyfile(tiny_h5, path)
        assert client.datasets() == ["late", "tiny"]  # listing looks at the files again
        assert client.unavailable_datasets() == {}
        assert _health(handle.server.address, dataset_health_name("late")) == SERVING


def test_a_change_while_a_message_is_built_never_reaches_the_client(tmp_path: Path) -> None:
    """The look after building: a read that overlapped a change is discarded, whatever it read."""
    path = tmp_path / "a.h5"
    write_arrays_dataset(path, _volumes(seed=1))
    served = ServedDataset("a", path, BlockCache(1 << 24))
    version = served.current()

    def build_during_a_change() -> np.ndarray:
        data = version.read(version.data_location("images", 0), (slice(0, 2),))
        write_arrays_dataset(path, _volumes(seed=5))  # lands after the read, before the message would be sent
        return data

    from patchwire.service._datasource import DatasourceCache

    cache = DatasourceCache({"a": served})
    with pytest.raises(FailedPrecondition, match="changed on disk during this call"):
        cache.consistent(version, build_during_a_change)
    new = served.current()
    assert new is not version and version.retired
    np.testing.assert_array_equal(new.read(new.data_location("images", 0), (0,)), _slices(path)[0])
    served.close()


# -- verification ---------------------------------------------------------------------------------------------------


def _rewrite_in_place_keeping_size_and_mtime(path: Path, location: str) -> None:
    """Overwrites the first bytes of a contiguous array inside the file, then restores the modification time: the
    file's size, modification time, inode and device are what they were."""
    before = path.stat()
    with h5py.File(path, "r") as f:
        offset = f[location].id.get_offset()
    with open(path, "r+b") as raw:
        raw.seek(offset)
        raw.write(np.full(64, 12345.0, np.float32).tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
        before.st_dev,
    )


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_only_verify_catches_a_rewrite_that_keeps_size_and_mtime(
    verify: bool, tiny_h5: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "copy.h5"
    shutil.copyfile(tiny_h5, path)
    expected = _slices(tiny_h5)
    with (
        threaded_server({"copy": path}, verify=verify, cache_bytes=0) as handle,
        pw.connect(handle.server.address) as client,
    ):
        ds = client.datasource("copy", extr.SliceIndexing(), extr.DataExtractor(("images",)))
        try:
            np.testing.assert_array_equal(ds[0]["images"], expected[0])
            # subject 1's images, not read since the open (HDF5 keeps the last small region it read in memory)
            _rewrite_in_place_keeping_size_and_mtime(path, "data/images/1")
            if not verify:  # the scenario is real: without checksums the rewritten bytes are served
                assert not np.array_equal(ds[20]["images"], expected[20])
                return
            with (
                caplog.at_level(logging.ERROR, logger="patchwire"),
                pytest.raises(pw.InvalidArgumentError, match="checksum mismatch") as raised,
            ):
                ds[20]
            assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert any("'copy' is not served" in m and "data/images/1" in m for m in errors), errors
            with pytest.raises(pw.InvalidArgumentError, match="dataset 'copy' is unavailable"):
                ds[0]  # another subject's slice, intact: the whole dataset stops being served
        finally:
            ds.close()
        assert "checksum mismatch" in client.unavailable_datasets()["copy"]
        assert _health(handle.server.address, dataset_health_name("copy")) == NOT_SERVING
        assert _health(handle.server.address, "") == NOT_SERVING  # nothing left to serve


@pytest.mark.parametrize(
    "indexing",
    [extr.SliceIndexing(0), extr.SliceIndexing(2), extr.PatchWiseIndexing((8, 8, 8), ignore_incomplete=False)],
    ids=["axial", "sagittal", "patches"],
)
def test_verify_serves_exactly_the_same_samples(indexing: object, vary_h5: Path) -> None:
    extractor = extr.ComposeExtractor([extr.DataExtractor(("images", "labels", "mask")), extr.SubjectExtractor()])
    got = {}
    for verify in (False, True):
        with threaded_server({"vary": vary_h5}, verify=verify) as handle, pw.connect(handle.server.address) as client:
            ds = client.datasource("vary", indexing, extractor)  # type: ignore[arg-type]
            try:
                got[verify] = [ds[i] for i in range(len(ds))]
                again = [ds[i] for i in range(len(ds))]  # second pass: from the cache (moved and tiled copies too)
            finally:
                ds.close()
            for a, b in zip(got[verify], again, strict=True):
                for key in ("images", "labels", "mask"):
                    np.testing.assert_array_equal(a[key], b[key])
    assert len(got[False]) == len(got[True]) > 0
    for a, b in zip(got[False], got[True], strict=True):
        assert a["subject"] == b["subject"]
        for key in ("images", "labels", "mask"):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


SHAPE = (23, 9, 7, 2)


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[h5py.File]:
    path = tmp_path_factory.mktemp("checksums") / "a.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    f = h5py.File(path, "r")
    yield f
    f.close()


@settings(deadline=None, max_examples=200)
@given(expr=index_expressions(SHAPE, negative=True), block_rows=st.integers(1, 30))
def test_checked_reads_equal_h5py(h5: h5py.File, expr: tuple, block_rows: int) -> None:
    row_bytes = 9 * 7 * 2 * 4
    checksums = Checksums(BlockCache(0, block_rows * row_bytes).rows_per_block)
    checksums.take("x", h5["x"])
    expected = h5["x"][expr]
    got = checksums.read("x", h5["x"], SHAPE, expr)
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_array_equal(got, expected)


def test_a_checked_read_names_the_block_that_differs(h5: h5py.File) -> None:
    checksums = Checksums(BlockCache(0, 4 * 9 * 7 * 2 * 4).rows_per_block)  # 4 rows per block
    checksums.take("x", h5["x"])
    tampered = h5["x"][()]
    tampered[9, 0, 0, 0] += 1
    np.testing.assert_array_equal(checksums.read("x", tampered, SHAPE, (slice(0, 8),)), tampered[:8])
    with pytest.raises(ChecksumMismatch, match=r"x: rows 8\.\.11 differ"):
        checksums.read("x", tampered, SHAPE, (10, 3))
