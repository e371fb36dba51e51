"""Assembly through shared memory on the server's host: the same results as over the wire, the wire wherever shared
memory cannot be used, precise errors for segments the server cannot use, and a server that keeps serving.

The dataset here is larger than "tiny" (24x40x36 with two channels: a subject is 276 KB, a batch of eight slices
92 KB), so that predictions and volumes are payloads and not inline bytes.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import mmap
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import patchwire.client as pw
import patchwire.client._assembler as client_assembler
from patchwire.client import extraction as extr
from patchwire.service import PatchwireServer
from patchwire.service import _assembly as service_assembly
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, codec, shared_memory

import _assembly_fixtures
from _datasets import make_pymia_dataset
from _servers import server_in_thread, server_subprocess

client = _assembly_fixtures.client  # module-scoped fixtures on this module's server
stub = _assembly_fixtures.stub
expect_raw = _assembly_fixtures.expect_raw

SHAPE = (24, 40, 36)
IMAGES = extr.DataExtractor(categories=("images",))
RPC_TIMEOUT_S = 30

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pymia_dataset(tmp_path_factory.mktemp("shm"), shape=SHAPE)


@pytest.fixture(scope="module", params=["state-dir", "no-state-dir"])
def server(request: pytest.FixtureRequest, h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    state = tmp_path_factory.mktemp("state") if request.param == "state-dir" else None
    with server_in_thread({"big": h5}, state_dir=state) as srv:
        yield srv


@pytest.fixture(scope="module")
def images(client: pw.Client) -> list[np.ndarray]:
    ds = client.datasource("big", extr.EmptyIndexing(), IMAGES)
    try:
        return [ds[s]["images"] for s in range(3)]
    finally:
        ds.close()


@contextlib.contextmanager
def assembler(client: pw.Client, indexing: extr.IndexingStrategy, **kwargs: Any) -> Iterator[Any]:
    ds = client.datasource("big", indexing, IMAGES)
    asm = client.assembler(ds, **kwargs)
    try:
        yield asm
    finally:
        asm.close()
        if asm.job_id is not None:
            with contextlib.suppress(pw.NotFoundError):
                asm.delete()
        ds.close()


@pytest.fixture(autouse=True)
def fresh_spares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no spare segments of earlier assemblers (the tests that check reuse make their own)."""
    monkeypatch.setattr(client_assembler, "_SPARES", client_assembler._Spares())


@pytest.fixture
def no_wire_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if the client sends a payload as chunks or reads one from chunks."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a payload went over the wire")

    real = client_assembler._with_chunks

    def posted(batch: apb.PredictionBatch, payloads: Any) -> Any:
        if payloads:
            refuse()
        return real(batch, payloads)

    monkeypatch.setattr(client_assembler, "_with_chunks", posted)
    monkeypatch.setattr(client_assembler, "decode_stream", refuse)


def post_all_slices(asm: Any, images: list[np.ndarray], batch: int = 8, **kwargs: Any) -> None:
    order = np.arange(3 * SHAPE[0])
    for start in range(0, len(order), batch):
        indices = order[start : start + batch]
        asm.add_batch(np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in indices]), indices, **kwargs)
    asm.flush()


def segment_of(array: np.ndarray) -> Any:
    """The object at the bottom of an array's base chain."""
    base: Any = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


# -- through shared memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3])
def test_predictions_and_volumes_travel_through_shared_memory(
    client: pw.Client, images: list[np.ndarray], no_wire_payloads: None, window: int
) -> None:
    with assembler(client, extr.SliceIndexing(0), window=window) as asm:
        post_all_slices(asm, images)
        assert asm.uses_shared_memory
        assert asm.subjects_ready == {0, 1, 2}
        for s in range(3):
            volume = asm.get_assembled_subject(s)
            np.testing.assert_array_equal(volume, images[s])
            assert isinstance(segment_of(volume), mmap.mmap)
            volume[0, 0, 0, 0] = -1.0  # the user's own copy: writable, like pymia's
        assert asm.status().received == 3 * SHAPE[0]


def test_patches_of_two_shapes_and_averaged_overlaps_through_shared_memory(
    client: pw.Client, images: list[np.ndarray], no_wire_payloads: None
) -> None:
    """Border patches (clamped) go per sample; each overlap mode gets the volume itself back (identity predictions
    averaged are themselves)."""
    indexing = extr.PatchWiseIndexing((16, 16, 16), ignore_incomplete=False)
    grid = [
        (slice(z, z + 16), slice(y, y + 16), slice(x, x + 16))
        for z, y, x in itertools.product(range(0, SHAPE[0], 16), range(0, SHAPE[1], 16), range(0, SHAPE[2], 16))
    ]  # C order, border patches clamped by numpy as by the server
    regions = [(s, region) for s in range(3) for region in grid]
    for overlap in ("overwrite", "average"):
        with assembler(client, indexing, overlap=overlap, window=2) as asm:
            for start in range(0, len(regions), 5):
                indices = list(range(start, min(start + 5, len(regions))))
                predictions = [images[regions[i][0]][regions[i][1]] for i in indices]
                asm.add_samples({"__prediction": predictions}, indices)
            asm.flush()
            assert asm.uses_shared_memory
            for s in range(3):
                np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])


def test_a_kept_volume_is_never_overwritten_by_later_fetches_and_dropped_ones_are_reused(
    client: pw.Client, images: list[np.ndarray]
) -> None:
    with assembler(client, extr.SliceIndexing(0)) as asm:
        asm._files_ok = False  # volumes are written into the client's segments (not mapped from the server's files)
        post_all_slices(asm, images)
        kept = asm.get_assembled_subject(0)
        token = None
        for _ in range(3):
            for s in (1, 2):
                volume = asm.get_assembled_subject(s)
                np.testing.assert_array_equal(volume, images[s])
                del volume
                gc.collect()
            free = asm._fetch_segments._free
            assert free, "a fetched volume that is gone gives its segment back"
            token = token or free[-1].token
            assert free[-1].token == token, "the same segment serves fetch after fetch"
        np.testing.assert_array_equal(kept, images[0])


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "wire"])
def test_strided_predictions_are_posted_as_they_are(
    client: pw.Client, images: list[np.ndarray], shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predictions that are views with gaps (here every other channel of a wider array) go into the posting segment
    with one strided copy, with no contiguous copy first; over the wire as a contiguous copy. The volumes are the
    same."""
    if shared:

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a large prediction was encoded through a contiguous copy")

        monkeypatch.setattr(codec, "array_to_tensor", refuse)
    with assembler(client, extr.SliceIndexing(0), shared_memory=shared) as asm:
        for start in range(0, 3 * SHAPE[0], 8):
            indices = np.arange(start, start + 8)
            stacked = np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in indices])
            wide = np.zeros((*stacked.shape[:-1], 2 * stacked.shape[-1]), stacked.dtype)
            wide[..., ::2] = stacked
            strided = wide[..., ::2]
            assert not strided.flags.c_contiguous
            asm.add_batch(strided, indices)
        asm.flush()
        assert asm.uses_shared_memory == shared
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])


def test_a_later_assembler_posts_through_the_segment_of_an_earlier_one(
    client: pw.Client, images: list[np.ndarray], no_wire_payloads: None
) -> None:
    """A closed assembler's posting segment (everything in it acknowledged) is kept for the next assembler of the
    process, whose batches then land in pages the process already has."""
    with assembler(client, extr.SliceIndexing(0)) as first:
        post_all_slices(first, images)
        assert first._slots.segment is not None
        token = first._slots.segment.token
    assert client_assembler._SPARES._posting is not None
    with assembler(client, extr.SliceIndexing(0)) as second:
        post_all_slices(second, images)
        assert second._slots.segment is not None and second._slots.segment.token == token
        for s in range(3):
            np.testing.assert_array_equal(second.get_assembled_subject(s), images[s])


def test_a_forked_child_keeps_none_of_the_parents_spare_segments(client: pw.Client, images: list[np.ndarray]) -> None:
    """A forked child shares its parent's segments' pages: it must not post or fetch through them, so it starts
    with no spares, and the parent keeps its own."""
    with assembler(client, extr.SliceIndexing(0)) as asm:
        asm._files_ok = False  # fetched into a segment, which comes back as a spare once the volume is gone
        post_all_slices(asm, images)
        np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])
        gc.collect()
    spares = client_assembler._SPARES
    assert spares._posting is not None and spares.fetching._free
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        child = client_assembler._SPARES
        os._exit(0 if child._posting is None and not child.fetching._free else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert spares._posting is not None and spares.fetching._free


def test_a_growing_batch_moves_to_a_larger_segment(
    client: pw.Client, images: list[np.ndarray], no_wire_payloads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_assembler, "SLOT_GRANULE", 64 << 10)
    monkeypatch.setattr(client_assembler, "_SPARES", client_assembler._Spares())  # no spare segment to start from
    with assembler(client, extr.SliceIndexing(0), window=2) as asm:
        sizes = [8, 8, 16, 40]  # 72 slices: every sample once; 92 KB up to 461 KB
        start = 0
        segments = set()
        for size in sizes:
            indices = np.arange(start, start + size)
            asm.add_batch(np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in indices]), indices)
            start += size
            assert asm._slots.segment is not None
            segments.add(asm._slots.segment.token)
        asm.flush()
        assert len(segments) > 1
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the server files the client maps (fetched volumes), in order."""
    paths: list[str] = []
    real = shared_memory.map_file

    def spy(ref: apb.SharedFile, nbytes: int) -> Any:
        paths.append(ref.path)
        return real(ref, nbytes)

    monkeypatch.setattr(shared_memory, "map_file", spy)
    return paths


def _wait_until_written(server: PatchwireServer, asm: Any) -> None:
    """Waits until the server's background thread has written every ready subject's volume to results/."""
    assert server._assembly is not None
    for subject in server._assembly.get(str(asm.job_id)).subjects.values():
        assert subject.finished is None or subject.finished.wait(30)


def test_finished_volumes_are_mapped_from_the_servers_files_and_writes_stay_local(
    server: PatchwireServer, client: pw.Client, images: list[np.ndarray], mapped: list[str]
) -> None:
    """With a state folder a finished volume is a result file, mapped privately; without one an overwrite volume
    stays in the server's memory and is written into the client's segment."""
    with assembler(client, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        _wait_until_written(server, asm)
        first = asm.get_assembled_subject(1)
        first[...] = 0  # a private mapping or the client's own segment: the server keeps the volume
        np.testing.assert_array_equal(asm.get_assembled_subject(1), images[1])
        if server.config.state_dir is not None:
            assert len(mapped) == 2 and all("/results/" in path for path in mapped)
            assert asm._files_ok
        else:
            assert mapped == []
            assert isinstance(segment_of(first), mmap.mmap)


def test_files_that_cannot_be_mapped_here_are_written_into_the_segment_instead(
    server: PatchwireServer, client: pw.Client, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_memory, "map_file", lambda ref, nbytes: None)  # e.g. another mount namespace
    with assembler(client, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        _wait_until_written(server, asm)
        for s in range(3):
            volume = asm.get_assembled_subject(s)
            np.testing.assert_array_equal(volume, images[s])
            assert isinstance(segment_of(volume), mmap.mmap)
        assert asm.uses_shared_memory
        # asked once, then no more (a server without a state folder kept these volumes in memory: no files)
        assert asm._files_ok == (server.config.state_dir is None)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "wire"])
def test_kept_volumes_spilled_beyond_the_budget_are_fetched_from_their_files(
    h5: Path, images: list[np.ndarray], shared: bool, mapped: list[str]
) -> None:
    """Without a state folder, finished overwrite volumes stay in memory within the assembly budget; older ones are
    spilled to their buffer files, which a same-host client maps and any client can fetch."""
    one_subject = images[0].nbytes
    with (
        server_in_thread({"big": h5}, assembly_memory_bytes=one_subject + one_subject // 2) as srv,
        pw.connect(srv.address) as c,
        assembler(c, extr.SliceIndexing(0), shared_memory=shared) as asm,
    ):
        post_all_slices(asm, images)
        assert srv._assembly is not None
        job = srv._assembly.get(str(asm.job_id))
        assert [job.subjects[s].mapped is None for s in range(3)] == [True, True, False]
        for s in (0, 2):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])
        assert mapped == ([] if not shared else [mapped[0]])
        if shared:
            assert "/buffers/0." in mapped[0]


# -- kept volumes mapped from the server's memory, under leases ------------------------------------------------------


@pytest.fixture
def share_small_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept volumes of any size live in memory the client maps (the server's default is 4 MiB and up)."""
    monkeypatch.setattr(service_assembly, "SHARED_VOLUME_MIN_BYTES", 0)


@pytest.fixture
def in_memory(h5: Path, share_small_volumes: None) -> Iterator[PatchwireServer]:
    with server_in_thread({"big": h5}) as srv:
        yield srv


def pool_of(server: PatchwireServer) -> Any:
    assert server._assembly is not None
    return server._assembly.pool


def test_kept_volumes_are_mapped_from_the_servers_memory_and_given_back_for_reuse(
    in_memory: PatchwireServer, images: list[np.ndarray], mapped: list[str]
) -> None:
    """Without a state folder a finished volume is mapped from the server's own memory (nothing copied); writes stay
    in the client. The memory is lent: once the client's arrays are gone it gives the leases back, and the server
    reuses that memory for later subjects."""
    pool = pool_of(in_memory)
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        first = asm.get_assembled_subject(1)
        assert mapped == [mapped[0]] and mapped[0].startswith(f"/proc/{os.getpid()}/fd/")  # (in-process server)
        fd = os.open(mapped[0], os.O_RDWR)
        try:  # sealed: a process that can open it still cannot take pages from under the server's writes
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        first[...] = 0  # a private mapping: the server's volume stays as it was
        again = asm.get_assembled_subject(1)
        np.testing.assert_array_equal(again, images[1])
        lent = set(pool._leases)
        assert len(lent) == 2
        del first, again
        gc.collect()
        np.testing.assert_array_equal(asm.get_assembled_subject(2), images[2])  # (gives back the two leases first)
        assert not lent & set(pool._leases)
        spare_before = pool.spare_bytes
        asm.delete()
        assert pool.spare_bytes > spare_before and all(m.fd is not None for m in pool._spare)
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        assert pool.spare_bytes < spare_before + images[0].nbytes, "the next job assembles in the spare memory"
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])


@pytest.mark.parametrize("budget_subjects", [8, 1.5], ids=["held", "given-up"])
def test_memory_a_client_still_maps_is_never_reused(
    h5: Path, images: list[np.ndarray], share_small_volumes: None, budget_subjects: float
) -> None:
    """A volume the client still holds after its job is deleted keeps its content while later jobs assemble other
    data: its memory is held for the lease (8 subjects' budget), or given up to the client's mapping when the budget
    needs the room (1.5 subjects), never reused."""
    budget = int(images[0].nbytes * budget_subjects)
    with server_in_thread({"big": h5}, assembly_memory_bytes=budget) as srv, pw.connect(srv.address) as c:
        pool = pool_of(srv)
        with assembler(c, extr.SliceIndexing(0)) as asm:
            post_all_slices(asm, images)
            kept = asm.get_assembled_subject(2)  # (the last subject: in memory within any of the budgets)
            asm.delete()
        assert len(pool._leases) == 1 and pool.held_bytes == kept.nbytes  # dropped by the job, held for the lease
        negated = [-image for image in images]
        for _ in range(2):
            with assembler(c, extr.SliceIndexing(0)) as asm:
                post_all_slices(asm, negated)
                for s in range(3):
                    np.testing.assert_array_equal(asm.get_assembled_subject(s), negated[s])
        np.testing.assert_array_equal(kept, images[2])
        if budget_subjects == 8:
            assert len(pool._leases) == 1 and pool.held_bytes == kept.nbytes
        else:  # the later jobs needed the room: the memory went to the client's mapping alone
            assert not pool._leases and pool.held_bytes == 0
        del kept
        gc.collect()
        with assembler(c, extr.SliceIndexing(0)) as asm:
            post_all_slices(asm, images)  # (any fetch or the close gives back what the client no longer maps)
        assert pool.held_bytes == 0 and not pool._leases


def test_a_forked_child_keeps_its_parents_volumes_from_being_reused(
    in_memory: PatchwireServer, images: list[np.ndarray]
) -> None:
    """A forked child inherits the mappings of volumes fetched before the fork: their leases are never given back
    (the server frees that memory instead of reusing it); volumes fetched after it are given back as usual."""
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        before = asm.get_assembled_subject(0)
        pid = os.fork()
        if pid == 0:  # the child: report by exit status only
            ok = np.array_equal(before, images[0]) and not client_assembler._LEASES._gone
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        after = asm.get_assembled_subject(1)
        del before, after
        gc.collect()
        gone = client_assembler._LEASES.take(in_memory.address)
        assert len(gone) == 1, "only the lease of the volume fetched after the fork comes back"
        assert pool_of(in_memory).give_back(gone) == 1


def test_without_room_for_more_memfds_kept_volumes_are_copied_into_the_clients_segment(
    in_memory: PatchwireServer, images: list[np.ndarray], mapped: list[str]
) -> None:
    """Each memfd holds two descriptors: a server uses at most a quarter of its descriptor limit for them and
    assembles further volumes in anonymous memory, which a fetch copies."""
    pool = pool_of(in_memory)
    assert pool._memfds_max == resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4
    pool._memfds_max = 2
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        assert pool.memfds == 2
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])
    assert len(mapped) == 2, "the third volume was copied"


def test_giving_back_unknown_leases_is_harmless_and_bad_ones_are_refused(
    in_memory: PatchwireServer, images: list[np.ndarray]
) -> None:
    with grpc.insecure_channel(in_memory.address, options=codec.channel_options()) as channel:
        stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
        request = apb.ReleaseSharedFilesRequest(leases=[os.urandom(16), os.urandom(64)])
        assert stub.ReleaseSharedFiles(request, timeout=RPC_TIMEOUT_S).released == 0
        with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "leases[1]", "1 to 64 bytes, got 0"):
            stub.ReleaseSharedFiles(apb.ReleaseSharedFilesRequest(leases=[b"x", b""]), timeout=RPC_TIMEOUT_S)
        too_many = apb.ReleaseSharedFilesRequest(leases=[b"x"] * 65537)
        with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "at most 65536 per request, got 65537"):
            stub.ReleaseSharedFiles(too_many, timeout=RPC_TIMEOUT_S)
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)  # the server kept serving
        np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])


# -- the wire where shared memory cannot be used --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wire_only_server(h5: Path) -> Iterator[Any]:
    with server_in_thread({"big": h5}, shared_memory=False) as srv:
        yield srv


def test_a_server_without_shared_memory_gets_everything_over_the_wire(
    wire_only_server: PatchwireServer, images: list[np.ndarray]
) -> None:
    with pw.connect(wire_only_server.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        assert not asm.uses_shared_memory
        for s in range(3):
            volume = asm.get_assembled_subject(s)
            np.testing.assert_array_equal(volume, images[s])
            assert not isinstance(segment_of(volume), mmap.mmap)


def test_requiring_shared_memory_from_a_server_without_it_says_why(
    wire_only_server: PatchwireServer, images: list[np.ndarray]
) -> None:
    with (
        pw.connect(wire_only_server.address) as c,
        assembler(c, extr.SliceIndexing(0), shared_memory=True) as asm,
        pytest.raises(ValueError, match="shared memory is off on this server"),
    ):
        post_all_slices(asm, images)


def test_shared_memory_false_keeps_to_the_wire(client: pw.Client, images: list[np.ndarray]) -> None:
    with assembler(client, extr.SliceIndexing(0), shared_memory=False) as asm:
        post_all_slices(asm, images)
        assert not asm.uses_shared_memory
        volume = asm.get_assembled_subject(1)
        np.testing.assert_array_equal(volume, images[1])
        assert not isinstance(segment_of(volume), mmap.mmap)


def test_a_subject_larger_than_the_segment_comes_over_the_wire(
    client: pw.Client, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_assembler, "FETCH_SEGMENT_BYTES", 1024)
    with assembler(client, extr.SliceIndexing(0)) as asm:
        asm._files_ok = False  # (files would carry any size)
        post_all_slices(asm, images)
        assert asm.uses_shared_memory
        volume = asm.get_assembled_subject(2)
        np.testing.assert_array_equal(volume, images[2])
        assert not isinstance(segment_of(volume), mmap.mmap)


# -- segments the server cannot use ---------------------------------------------------------------------------------


def probe(stub: Any, ref: apb.SharedMemory, for_posting: bool = True) -> apb.ProbeSharedMemoryResponse:
    request = apb.ProbeSharedMemoryRequest(shared_memory=ref, for_posting=for_posting)
    response: apb.ProbeSharedMemoryResponse = stub.ProbeSharedMemory(request, timeout=RPC_TIMEOUT_S)
    return response


def test_probing_a_usable_segment_gives_its_size(stub: Any) -> None:
    segment = shared_memory.Segment(8192, sealed=True)
    try:
        assert probe(stub, segment.proto()).size == shared_memory.HEADER_BYTES + 8192
    finally:
        segment.close()


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda seg: apb.SharedMemory(path="/etc/passwd", token=seg.token), ["is not a segment name"]),
        (lambda seg: apb.SharedMemory(path="/proc/self/fd/0", token=seg.token), ["is not a segment name"]),
        (lambda seg: apb.SharedMemory(path=seg.path, token=b"short"), ["token: must be 16 to 64 bytes"]),
        (lambda seg: apb.SharedMemory(path=seg.path, token=os.urandom(32)), ["does not begin with the token"]),
        (
            lambda seg: apb.SharedMemory(path=f"/proc/{os.getpid()}/fd/999999", token=seg.token),
            ["does not exist here", "another host"],
        ),
    ],
    ids=["not-proc", "self", "short-token", "wrong-token", "no-such-fd"],
)
def test_a_segment_the_server_cannot_use_fails_precondition_with_the_reason(
    stub: Any, make: Any, fragments: list[str]
) -> None:
    segment = shared_memory.Segment(4096, sealed=True)
    try:
        with expect_raw(grpc.StatusCode.FAILED_PRECONDITION, "shared_memory", *fragments):
            probe(stub, make(segment))
    finally:
        segment.close()


def test_only_memfd_segments_are_opened(stub: Any, tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"x" * 64)
    fd = os.open(path, os.O_RDWR)
    try:
        with expect_raw(grpc.StatusCode.FAILED_PRECONDITION, "is not a memfd segment"):
            probe(stub, apb.SharedMemory(path=f"/proc/{os.getpid()}/fd/{fd}", token=b"x" * 32))
    finally:
        os.close(fd)


def test_posting_needs_a_segment_that_cannot_shrink(stub: Any) -> None:
    segment = shared_memory.Segment(4096, sealed=False)
    try:
        probe(stub, segment.proto(), for_posting=False)  # fetching into it is fine
        with expect_raw(grpc.StatusCode.FAILED_PRECONDITION, "not sealed against shrinking"):
            probe(stub, segment.proto(), for_posting=True)
    finally:
        segment.close()


def shared_batch(
    segment: shared_memory.Segment, job_id: str, indices: list[int], prediction: np.ndarray
) -> apb.PostPredictionsRequest:
    """One batch whose payload lies in ``segment``, just after its header."""
    tensor, payload = codec.array_to_tensor(np.ascontiguousarray(prediction))
    assert payload is not None
    segment.view(shared_memory.HEADER_BYTES, len(payload))[:] = np.frombuffer(payload, dtype=np.uint8)
    batch = apb.PredictionBatch(job_id=job_id, sample_indices=indices, shared_memory=segment.proto())
    batch.fields.add(key="__prediction", stacked=tensor)
    batch.shared_offsets.append(shared_memory.HEADER_BYTES)
    return apb.PostPredictionsRequest(batch=batch)


@pytest.mark.parametrize(
    ("change", "code", "fragments"),
    [
        (lambda b: b.batch.shared_offsets.__setitem__(0, 1 << 40), grpc.StatusCode.INVALID_ARGUMENT, ["lie outside"]),
        (lambda b: b.batch.shared_offsets.__setitem__(0, -8), grpc.StatusCode.INVALID_ARGUMENT, ["lie outside"]),
        (lambda b: b.batch.shared_offsets.append(0), grpc.StatusCode.INVALID_ARGUMENT, ["2 offsets for 1"]),
        (
            lambda b: b.batch.ClearField("shared_memory"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["given without batch.shared_memory"],
        ),
        (
            lambda b: b.batch.shared_memory.__setattr__("token", os.urandom(32)),
            grpc.StatusCode.FAILED_PRECONDITION,
            ["batch.shared_memory", "does not begin with the token"],
        ),
    ],
    ids=["beyond-the-end", "negative", "offset-count", "no-segment", "wrong-token"],
)
def test_a_bad_shared_batch_is_refused_and_nothing_is_lost(
    client: pw.Client, stub: Any, images: list[np.ndarray], change: Any, code: grpc.StatusCode, fragments: list[str]
) -> None:
    with assembler(client, extr.SliceIndexing(0), entries={"__prediction": 2}) as asm:
        segment = shared_memory.Segment(1 << 20, sealed=True)
        try:
            good = shared_batch(segment, asm.job_id, list(range(8)), images[0][:8])
            assert len(list(stub.PostPredictions(iter([good]), timeout=RPC_TIMEOUT_S))) == 1
            bad = shared_batch(segment, asm.job_id, list(range(8, 16)), images[0][8:16])
            change(bad)
            with expect_raw(code, *fragments):
                list(stub.PostPredictions(iter([bad]), timeout=RPC_TIMEOUT_S))
            assert asm.status().received == 8, "the acknowledged batch is kept, the refused one not applied"
            rest = shared_batch(segment, asm.job_id, list(range(8, 24)), images[0][8:24])
            (ack,) = stub.PostPredictions(iter([rest]), timeout=RPC_TIMEOUT_S)
            assert list(ack.ready_subjects) == [0]
        finally:
            segment.close()
        np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])


def test_a_fetch_into_a_segment_too_small_sends_chunks(client: pw.Client, stub: Any, images: list[np.ndarray]) -> None:
    with assembler(client, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        segment = shared_memory.Segment(1024, sealed=False)
        try:
            request = apb.FetchSubjectRequest(job_id=asm.job_id, subject_index=1, shared_memory=segment.proto())
            responses = list(stub.FetchSubject(request, timeout=RPC_TIMEOUT_S))
        finally:
            segment.close()
        assert not responses[0].shared_offsets
        assert [r.WhichOneof("payload") for r in responses[1:]] == ["chunk"] * (len(responses) - 1)
        assert len(responses) > 1


# -- a server in another process ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra_args", "shared"),
    [((), True), (("--state-dir", "{state}"), True), (("--no-shared-memory",), False)],
    ids=["in-memory", "state-dir", "no-shared-memory"],
)
def test_a_server_in_another_process(h5: Path, tmp_path: Path, extra_args: tuple[str, ...], shared: bool) -> None:
    """The segments cross a process boundary as they do in deployment: the server opens the client's descriptors
    through /proc, and the client maps the server's result files; ``--no-shared-memory`` keeps it to the wire."""
    args = tuple(a.format(state=tmp_path / "state") for a in extra_args)
    with server_subprocess({"big": h5}, args) as address, pw.connect(address) as c:
        ds = c.datasource("big", extr.EmptyIndexing(), IMAGES)
        images = [ds[s]["images"] for s in range(3)]
        ds.close()
        with assembler(c, extr.SliceIndexing(0)) as asm:
            post_all_slices(asm, images)
            assert asm.uses_shared_memory is shared
            for s in range(3):
                volume = asm.get_assembled_subject(s)
                np.testing.assert_array_equal(volume, images[s])
                assert isinstance(segment_of(volume), mmap.mmap) is shared


def test_a_volume_in_the_memory_of_a_server_in_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept volume of 4 MiB and more is mapped from the memfd of a ``patchwire serve`` process (through /proc, as
    in deployment) and its lease comes back; the server then reuses that memory for the next job."""
    shape = (64, 128, 64)  # x 2 channels of float32: 4 MiB, the server's smallest shared volume
    h5 = make_pymia_dataset(tmp_path, subjects=1, shape=shape)
    mapped: list[apb.SharedFile] = []
    real = shared_memory.map_file

    def spy(ref: apb.SharedFile, nbytes: int) -> Any:
        mapped.append(ref)
        return real(ref, nbytes)

    monkeypatch.setattr(shared_memory, "map_file", spy)
    with server_subprocess({"big": h5}) as address, pw.connect(address) as c:
        ds = c.datasource("big", extr.EmptyIndexing(), IMAGES)
        image = ds[0]["images"]
        ds.close()
        assert image.nbytes == service_assembly.SHARED_VOLUME_MIN_BYTES
        for _ in range(2):
            with assembler(c, extr.SliceIndexing(0)) as asm:
                for start in range(0, shape[0], 16):
                    asm.add_batch(image[start : start + 16], np.arange(start, start + 16))
                asm.flush()
                volume = asm.get_assembled_subject(0)
                np.testing.assert_array_equal(volume, image)
                assert mapped[-1].lease and mapped[-1].path.startswith("/proc/")
                assert not mapped[-1].path.startswith(f"/proc/{os.getpid()}/")
                del volume
                gc.collect()
            assert not client_assembler._LEASES.take(address), "the lease went back when the assembler closed"
        assert len(mapped) == 2 and mapped[0].inode == mapped[1].inode, "the second job reused the first one's memfd"
