"""Assembly through shared memory on the server's host: the same results as over the wire, the wire wherever shared
memory cannot be used, precise errors for segments the server cannot use, and a server that keeps serving.

The dataset here is larger than "tiny" (24x40x36 with two channels: a subject is 276 KB, a batch of eight slices
92 KB), so that predictions and volumes are payloads and not inline bytes.

Long because every test runs on both server configurations (with and without a state folder) of one module-scoped
fixture, and the descriptor hand-over is checked from both ends at once; the transports alone are unit-tested in
``tests/unit/client/assembly``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import mmap
import os
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import _shared_memory as process
from patchwire.client import extraction as extr
from patchwire.client.assembly.transports import segment as posting_segment
from patchwire.service import PatchwireServer
from patchwire.service._auth import ANONYMOUS
from patchwire.service._errors import NotFound
from patchwire.service.assembly import memory as assembly_memory
from patchwire.service.assembly import servicer as assembly_servicer
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, tensor_pb2
from patchwire.wire import framing, shared_memory, tensors

from _checks import expect_raw, region_of_another_identity
from _datasets import make_pymia_dataset
from _servers import serve_process, server_in_thread, server_subprocess

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
    monkeypatch.setattr(process, "SPARES", process.Spares())


def assert_no_wire_payloads(asm: Any) -> None:
    """No payload of ``asm``'s was sent as chunks or read from chunks: all went through shared memory."""
    statistics = asm.transport.statistics
    assert statistics.posted_wire_bytes == 0 and statistics.fetched_wire_bytes == 0, "a payload went over the wire"


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
    client: pw.Client, images: list[np.ndarray], window: int
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
        assert_no_wire_payloads(asm)


def test_patches_of_two_shapes_and_averaged_overlaps_through_shared_memory(
    client: pw.Client, images: list[np.ndarray]
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
            assert_no_wire_payloads(asm)


def test_a_kept_volume_is_never_overwritten_by_later_fetches_and_dropped_ones_are_reused(
    client: pw.Client, images: list[np.ndarray]
) -> None:
    with assembler(client, extr.SliceIndexing(0)) as asm:
        asm.transport.accept_files = False  # volumes are written into the client's segments (not the server's files)
        post_all_slices(asm, images)
        kept = asm.get_assembled_subject(0)
        first = None
        for _ in range(3):
            for s in (1, 2):
                volume = asm.get_assembled_subject(s)
                np.testing.assert_array_equal(volume, images[s])
                del volume
                gc.collect()
            free = process.SPARES.fetching.free
            assert free, "a fetched volume that is gone gives its segment back"
            first = first or free[-1]
            assert free[-1] is first, "the same segment serves fetch after fetch"
        np.testing.assert_array_equal(kept, images[0])


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "wire"])
def test_strided_predictions_are_posted_as_they_are(client: pw.Client, images: list[np.ndarray], shared: bool) -> None:
    """Predictions that are views with gaps (here every other channel of a wider array) go into the posting segment,
    or over the wire as a contiguous copy. The volumes are the same. (That the segment takes them with one strided
    copy and no contiguous copy first: tests/unit/client/assembly/test_transports.py.)"""
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
        statistics = asm.transport.statistics
        posted = statistics.posted_shared_bytes if shared else statistics.posted_wire_bytes
        assert posted == sum(image.nbytes for image in images)
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])


def test_a_later_assembler_posts_through_the_segment_of_an_earlier_one(
    client: pw.Client, images: list[np.ndarray]
) -> None:
    """A closed assembler's posting segment (everything in it acknowledged) is kept for the next assembler of the
    process, whose batches then land in pages the process already has."""
    with assembler(client, extr.SliceIndexing(0)) as first:
        post_all_slices(first, images)
        segment = first.transport.posting.slots.segment
        assert segment is not None
        assert_no_wire_payloads(first)
    assert process.SPARES.posting is segment
    with assembler(client, extr.SliceIndexing(0)) as second:
        post_all_slices(second, images)
        assert second.transport.posting.slots.segment is segment
        for s in range(3):
            np.testing.assert_array_equal(second.get_assembled_subject(s), images[s])
        assert_no_wire_payloads(second)


def test_a_forked_child_keeps_none_of_the_parents_spare_segments(client: pw.Client, images: list[np.ndarray]) -> None:
    """A forked child shares its parent's segments' pages: it must not post or fetch through them, so it starts
    with no spares, and the parent keeps its own."""
    with assembler(client, extr.SliceIndexing(0)) as asm:
        asm.transport.accept_files = False  # fetched into a segment, which comes back as a spare once it is gone
        post_all_slices(asm, images)
        np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])
        gc.collect()
    spares = process.SPARES
    assert spares.posting is not None and spares.fetching.free
    channel = process.CHANNELS.get(client.address)
    assert channel is not None
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        child = process.SPARES
        fresh = process.CHANNELS.get(client.address) is None  # (it makes its own connection)
        os._exit(0 if child.posting is None and not child.fetching.free and fresh else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert spares.posting is not None and spares.fetching.free
    assert channel.usable() and process.CHANNELS.get(client.address) is channel


def test_a_growing_batch_moves_to_a_larger_segment(
    client: pw.Client, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(posting_segment, "SLOT_GRANULE", 64 << 10)
    monkeypatch.setattr(process, "SPARES", process.Spares())  # no spare segment to start from
    with assembler(client, extr.SliceIndexing(0), window=2) as asm:
        sizes = [8, 8, 16, 40]  # 72 slices: every sample once; 92 KB up to 461 KB
        start = 0
        segments: list[Any] = []
        for size in sizes:
            indices = np.arange(start, start + size)
            asm.add_batch(np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in indices]), indices)
            start += size
            segment = asm.transport.posting.slots.segment
            assert segment is not None
            segments.append(segment)
        asm.flush()
        assert len({id(segment) for segment in segments}) > 1
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])
        assert_no_wire_payloads(asm)


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the server's descriptors the client maps (fetched volumes) are, in order: the targets of their
    ``/proc/self/fd`` links, as this process sees them (a memfd's name, or a file's path)."""
    paths: list[str] = []
    real = shared_memory.map_descriptor

    def spy(fd: int, offset: int, nbytes: int) -> Any:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(shared_memory, "map_descriptor", spy)
    return paths


def _wait_until_written(server: PatchwireServer, asm: Any) -> None:
    """Waits until the server's background thread has written every ready subject's volume to results/."""
    assert server.assembly is not None
    for subject in server.assembly.get(str(asm.job_id)).subjects.values():
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
            assert asm.transport.accept_files
        else:
            assert mapped == []
            assert isinstance(segment_of(first), mmap.mmap)


def test_files_that_cannot_be_mapped_here_are_written_into_the_segment_instead(
    server: PatchwireServer, client: pw.Client, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_memory, "map_descriptor", lambda fd, offset, nbytes: None)  # e.g. a short file
    with assembler(client, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        _wait_until_written(server, asm)
        for s in range(3):
            volume = asm.get_assembled_subject(s)
            np.testing.assert_array_equal(volume, images[s])
            assert isinstance(segment_of(volume), mmap.mmap)
        assert asm.uses_shared_memory
        # asked once, then no more (a server without a state folder kept these volumes in memory: no files)
        assert asm.transport.accept_files == (server.config.state_dir is None)


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
        assert srv.assembly is not None
        job = srv.assembly.get(str(asm.job_id))
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
    monkeypatch.setattr(assembly_memory, "SHARED_VOLUME_MIN_BYTES", 0)


@pytest.fixture
def in_memory(h5: Path, share_small_volumes: None) -> Iterator[PatchwireServer]:
    with server_in_thread({"big": h5}) as srv:
        yield srv


def pool_of(server: PatchwireServer) -> Any:
    assert server.assembly is not None
    return server.assembly.pool


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
        assert mapped == [mapped[0]] and mapped[0].startswith("/memfd:patchwire-volume")
        first[...] = 0  # a private mapping: the server's volume stays as it was
        again = asm.get_assembled_subject(1)
        np.testing.assert_array_equal(again, images[1])
        lent = pool.leases
        assert len(lent) == 2
        del first, again
        gc.collect()
        np.testing.assert_array_equal(asm.get_assembled_subject(2), images[2])  # (gives back the two leases first)
        assert not lent & pool.leases
        spare_before = pool.spare_bytes
        asm.delete()
        assert pool.spare_bytes > spare_before and pool.spare_shared_bytes == pool.spare_bytes
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
        assert len(pool.leases) == 1 and pool.held_bytes == kept.nbytes  # dropped by the job, held for the lease
        negated = [-image for image in images]
        for _ in range(2):
            with assembler(c, extr.SliceIndexing(0)) as asm:
                post_all_slices(asm, negated)
                for s in range(3):
                    np.testing.assert_array_equal(asm.get_assembled_subject(s), negated[s])
        np.testing.assert_array_equal(kept, images[2])
        if budget_subjects == 8:
            assert len(pool.leases) == 1 and pool.held_bytes == kept.nbytes
        else:  # the later jobs needed the room: the memory went to the client's mapping alone
            assert not pool.leases and pool.held_bytes == 0
        del kept
        gc.collect()
        with assembler(c, extr.SliceIndexing(0)) as asm:
            post_all_slices(asm, images)  # (any fetch or the close gives back what the client no longer maps)
        assert pool.held_bytes == 0 and not pool.leases


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
            ok = np.array_equal(before, images[0]) and not process.LEASES.pending
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        after = asm.get_assembled_subject(1)
        del before, after
        gc.collect()
        gone = process.LEASES.take(in_memory.address)
        assert len(gone) == 1, "only the lease of the volume fetched after the fork comes back"
        assert pool_of(in_memory).give_back(gone) == 1


def test_without_room_for_more_memfds_kept_volumes_are_copied_into_the_clients_segment(
    in_memory: PatchwireServer, images: list[np.ndarray], mapped: list[str]
) -> None:
    """Each memfd holds two descriptors: a server uses at most a quarter of its descriptor limit for them and
    assembles further volumes in anonymous memory, which a fetch copies."""
    pool = pool_of(in_memory)
    assert pool.memfds_max == resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4
    pool.memfds_max = 2
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        assert pool.memfds == 2
        for s in range(3):
            np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])
    assert len(mapped) == 2, "the third volume was copied"


def test_giving_back_unknown_leases_is_harmless_and_bad_ones_are_refused(
    in_memory: PatchwireServer, images: list[np.ndarray]
) -> None:
    with grpc.insecure_channel(in_memory.address, options=framing.channel_options()) as channel:
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
    monkeypatch.setattr(process, "FETCH_SEGMENT_BYTES", 1024)
    with assembler(client, extr.SliceIndexing(0)) as asm:
        asm.transport.accept_files = False  # (files would carry any size)
        post_all_slices(asm, images)
        assert asm.uses_shared_memory
        volume = asm.get_assembled_subject(2)
        np.testing.assert_array_equal(volume, images[2])
        assert not isinstance(segment_of(volume), mmap.mmap)


# -- segments the server cannot use ---------------------------------------------------------------------------------


@contextlib.contextmanager
def registered(stub: Any, segment: shared_memory.Segment, for_posting: bool = True) -> Iterator[bytes]:
    """``segment`` registered over a connection of its own (closed on exit); yields the region id."""
    channel, ticket = channel_for(stub, for_posting)
    try:
        yield segment.register(channel, ticket)
    finally:
        channel.close()


def ticket_for(stub: Any, for_posting: bool = True) -> bytes:
    """A fresh ticket."""
    response = stub.RegisterSharedMemory(
        apb.RegisterSharedMemoryRequest(for_posting=for_posting), timeout=RPC_TIMEOUT_S
    )
    ticket: bytes = response.ticket
    return ticket


def channel_for(stub: Any, for_posting: bool = True) -> tuple[shared_memory.Channel, bytes]:
    """A new connection to the server's socket, and a fresh ticket."""
    response = stub.RegisterSharedMemory(
        apb.RegisterSharedMemoryRequest(for_posting=for_posting), timeout=RPC_TIMEOUT_S
    )
    assert len(response.ticket) == 32 and response.ticket_ttl_ms > 0 and response.max_region_bytes > 0
    return shared_memory.Channel(response.socket_path), response.ticket


def test_a_registered_segment_is_named_by_a_random_region_id(stub: Any, server: PatchwireServer) -> None:
    segment = shared_memory.Segment(8192, sealed=True)
    try:
        with registered(stub, segment) as region, registered(stub, segment) as again:
            assert len(region) == 32 and region != again
            socket_path = stub.RegisterSharedMemory(apb.RegisterSharedMemoryRequest()).socket_path
            folder = Path(socket_path).parent
            assert folder.name.startswith("patchwire-shm-") and folder.stat().st_mode & 0o777 == 0o700
            assert Path(socket_path).is_socket() and server.shared_memory_socket is not None
            assert server.shared_memory_socket.path == socket_path
    finally:
        segment.close()


def test_a_request_cannot_name_a_path_or_a_descriptor(client: pw.Client, stub: Any, images: list[np.ndarray]) -> None:
    """The old scheme named a segment by ``/proc/<pid>/fd/<fd>`` and the server opened it (its own descriptors
    included). That cannot be expressed any more; what is left of such a message names no region, and a region id
    made of a path is simply unknown, with a status that says nothing about the server's descriptors."""
    with pytest.raises(ValueError, match="path"):
        tensor_pb2.SharedMemory(path=f"/proc/{os.getpid()}/fd/3")  # type: ignore[call-arg]
    old = b"\x0a\x10" + b"/proc/1234/fd/10" + b"\x12\x20" + bytes(32)  # path and token, as the old fields 1 and 2
    ref = tensor_pb2.SharedMemory.FromString(old)
    assert ref.region == b""
    with assembler(client, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        request = apb.FetchSubjectRequest(job_id=asm.job_id, subject_index=0, shared_memory=ref, accept_files=True)
        with expect_raw(grpc.StatusCode.INVALID_ARGUMENT, "shared_memory.region: a region id is 32 bytes, got 0"):
            list(stub.FetchSubject(request, timeout=RPC_TIMEOUT_S))
        for name in (f"/proc/{os.getpid()}/fd/3".encode().ljust(32, b"\0"), bytes(32), os.urandom(32)):
            request.shared_memory.region = name
            with pytest.raises(grpc.RpcError) as info:
                list(stub.FetchSubject(request, timeout=RPC_TIMEOUT_S))
            exc: Any = info.value
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert "no such region" in exc.details()
            assert "/proc" not in exc.details() and str(os.getpid()) not in exc.details()


def test_a_region_used_by_another_identity_is_permission_denied(
    client: pw.Client, stub: Any, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regions belong to the identity that registered them (here the server has no authentication: every caller is
    ANONYMOUS, so the caller's identity is switched in the service for the second request)."""
    with assembler(client, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        segment = shared_memory.Segment(1 << 20, sealed=False)
        try:
            with registered(stub, segment, for_posting=False) as region:
                request = apb.FetchSubjectRequest(
                    job_id=asm.job_id, subject_index=0, shared_memory=tensor_pb2.SharedMemory(region=region)
                )
                with region_of_another_identity(monkeypatch, assembly_servicer):
                    list(stub.FetchSubject(request, timeout=RPC_TIMEOUT_S))
                responses = list(stub.FetchSubject(request, timeout=RPC_TIMEOUT_S))
                assert responses[0].shared_offsets, "its owner still writes into it"
        finally:
            segment.close()


def test_descriptors_that_are_not_memfds_are_refused(stub: Any, tmp_path: Path) -> None:
    """A regular file (also one on tmpfs), a pipe or a socket is no segment: refused at registration, and the
    refusal names none of the server's descriptors."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x" * 8192)
    read_end, write_end = os.pipe()
    a, b = socket.socketpair()
    fds = [os.open(plain, os.O_RDWR), read_end, a.fileno()]
    if Path("/dev/shm").is_dir():
        shm_file = Path("/dev/shm") / f"patchwire-test-{os.getpid()}"
        fds.append(os.open(shm_file, os.O_RDWR | os.O_CREAT, 0o600))
        shm_file.unlink()
    channel, _ = channel_for(stub)
    try:
        for fd in fds:
            ticket = ticket_for(stub)
            with pytest.raises(shared_memory.ChannelError, match="not a memfd segment") as info:
                channel.register(ticket, fd)
            assert str(os.getpid()) not in str(info.value)
        assert channel.usable(), "a refusal keeps the connection"
    finally:
        channel.close()
        for fd in fds[:1] + fds[3:]:
            os.close(fd)
        os.close(read_end)
        os.close(write_end)
        a.close()
        b.close()


def test_posting_needs_a_sealed_segment_and_fetching_a_writable_one(stub: Any) -> None:
    unsealed = shared_memory.Segment(4096, sealed=False)
    channel, _ = channel_for(stub)
    try:
        ticket = ticket_for(stub, for_posting=False)
        assert len(unsealed.register(channel, ticket)) == 32  # fetching into it is fine
        ticket = ticket_for(stub, for_posting=True)
        with pytest.raises(shared_memory.ChannelError, match="not sealed against shrinking"):
            unsealed.register(channel, ticket)
        read_only = shared_memory.reopen_read_only(unsealed.fileno())
        try:
            ticket = ticket_for(stub, for_posting=False)
            with pytest.raises(shared_memory.ChannelError, match="read-only: it cannot be fetched into"):
                channel.register(ticket, read_only)
        finally:
            os.close(read_only)
    finally:
        unsealed.close()
        channel.close()


def test_closing_a_segment_unregisters_it(server: PatchwireServer, stub: Any) -> None:
    assert server.shared_memory_socket is not None
    registry = server.shared_memory_socket.registry
    segment = shared_memory.Segment(4096, sealed=True)
    with registered(stub, segment) as region:
        assert registry.region(region, ANONYMOUS, True, "shared_memory").id == region
        segment.close()  # (answered before it returns)
        with pytest.raises(NotFound):
            registry.region(region, ANONYMOUS, True, "shared_memory")


def test_a_ticket_is_used_once(stub: Any) -> None:
    segment = shared_memory.Segment(4096, sealed=True)
    channel, ticket = channel_for(stub)
    try:
        segment.register(channel, ticket)
        with pytest.raises(shared_memory.ChannelError, match="unknown or already used"):
            segment.register(channel, ticket)
        with pytest.raises(shared_memory.ChannelError, match="unknown or already used"):
            segment.register(channel, os.urandom(32))
    finally:
        segment.close()
        channel.close()


def test_closing_the_connection_frees_its_regions(
    server: PatchwireServer, client: pw.Client, stub: Any, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.shared_memory_socket is not None
    registry = server.shared_memory_socket.registry
    gone = threading.Event()
    real = registry.disconnect

    watched: list[bytes] = []

    def disconnect(connection: Any) -> None:
        ours = any(region in connection.regions for region in watched)
        real(connection)
        if ours:
            gone.set()

    monkeypatch.setattr(registry, "disconnect", disconnect)
    with assembler(client, extr.SliceIndexing(0), entries={"__prediction": 2}) as asm:
        segment = shared_memory.Segment(1 << 20, sealed=True)
        channel, ticket = channel_for(stub)
        try:
            region = segment.register(channel, ticket)
            watched.append(region)
            assert registry.region(region, ANONYMOUS, True, "batch.shared_memory").id == region
            first = shared_batch(segment, asm.job_id, list(range(8)), images[0][:8], region)
            assert len(list(stub.PostPredictions(iter([first]), timeout=RPC_TIMEOUT_S))) == 1
            channel.close()
            assert gone.wait(RPC_TIMEOUT_S)
            with pytest.raises(NotFound):
                registry.region(region, ANONYMOUS, True, "batch.shared_memory")
            again = shared_batch(segment, asm.job_id, list(range(8, 16)), images[0][8:16], region)
            with expect_raw(grpc.StatusCode.NOT_FOUND, "batch.shared_memory.region: no such region"):
                list(stub.PostPredictions(iter([again]), timeout=RPC_TIMEOUT_S))
        finally:
            segment.close()
        assert asm.status().received == 8


def test_a_peer_of_another_user_id_is_refused_and_the_client_uses_the_wire(h5: Path, images: list[np.ndarray]) -> None:
    with server_in_thread({"big": h5}, shared_memory_uids=(os.getuid() + 1,)) as srv, pw.connect(srv.address) as c:
        assert srv.shared_memory_socket is not None
        folder = Path(srv.shared_memory_socket.path).parent
        assert folder.stat().st_mode & 0o777 == 0o711, "other user ids must reach the socket: their uid is checked"
        with assembler(c, extr.SliceIndexing(0)) as asm:
            post_all_slices(asm, images)
            assert not asm.uses_shared_memory
            np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])
        with (
            assembler(c, extr.SliceIndexing(0), shared_memory=True) as asm,
            pytest.raises(ValueError, match=f"user id {os.getuid()} may not share memory"),
        ):
            post_all_slices(asm, images)
    assert not folder.exists(), "the socket's folder is removed at stop"


def test_leases_are_collected_only_over_the_connection_they_were_offered_to(
    h5: Path, images: list[np.ndarray], tmp_path: Path
) -> None:
    with (
        server_in_thread({"big": h5}, state_dir=tmp_path / "state") as srv,
        pw.connect(srv.address) as c,
        grpc.insecure_channel(srv.address, options=framing.channel_options()) as grpc_channel,
    ):
        stub = assembly_service_pb2_grpc.AssemblyServiceStub(grpc_channel)
        with assembler(c, extr.SliceIndexing(0), shared_memory=False) as asm:
            post_all_slices(asm, images)
            _wait_until_written(srv, asm)
            segment = shared_memory.Segment(1 << 20, sealed=False)
            mine, ticket = channel_for(stub, for_posting=False)
            other, _ = channel_for(stub)
            try:
                region = segment.register(mine, ticket)
                request = apb.FetchSubjectRequest(
                    job_id=asm.job_id,
                    subject_index=1,
                    accept_files=True,
                    shared_memory=tensor_pb2.SharedMemory(region=region),
                )
                (response,) = stub.FetchSubject(request, timeout=RPC_TIMEOUT_S)
                (ref,) = response.shared_files
                assert len(ref.lease) == 16 and not ref.lent_memory
                with pytest.raises(shared_memory.ChannelError, match="nothing to collect"):
                    other.collect(ref.lease)
                fd = mine.collect(ref.lease)
                try:
                    assert os.readlink(f"/proc/self/fd/{fd}").endswith(".npy")
                    assert os.get_blocking(fd) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                    array = shared_memory.map_descriptor(fd, ref.offset, images[1].nbytes)
                finally:
                    os.close(fd)
                assert array is not None
                np.testing.assert_array_equal(array.view(images[1].dtype).reshape(images[1].shape), images[1])
                with pytest.raises(shared_memory.ChannelError, match="nothing to collect"):
                    mine.collect(ref.lease)  # once only
            finally:
                segment.close()
                mine.close()
                other.close()


def test_lent_memory_can_only_be_mapped_privately(
    in_memory: PatchwireServer, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume lent from the server's memfd arrives as a read-only descriptor of a memfd sealed against resizing
    and against new writable shared mappings: reopened for writing or not, it cannot change the server's memory."""
    checked: list[int] = []
    real = shared_memory.map_descriptor

    def check(fd: int, offset: int, nbytes: int) -> Any:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(reopened, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(reopened, nbytes)  # a shared, writable mapping
        finally:
            os.close(reopened)
        checked.append(fd)
        return real(fd, offset, nbytes)

    monkeypatch.setattr(shared_memory, "map_descriptor", check)
    with pw.connect(in_memory.address) as c, assembler(c, extr.SliceIndexing(0)) as asm:
        post_all_slices(asm, images)
        volume = asm.get_assembled_subject(0)
        volume[...] = 0
        np.testing.assert_array_equal(asm.get_assembled_subject(0), images[0])
    assert len(checked) == 2


def shared_batch(
    segment: shared_memory.Segment, job_id: str, indices: list[int], prediction: np.ndarray, region: bytes
) -> apb.PostPredictionsRequest:
    """One batch whose payload lies in ``segment`` (registered as ``region``), just after its header."""
    tensor, payload = tensors.array_to_tensor(np.ascontiguousarray(prediction))
    assert payload is not None
    segment.view(shared_memory.HEADER_BYTES, len(payload))[:] = np.frombuffer(payload, dtype=np.uint8)
    batch = apb.PredictionBatch(
        job_id=job_id, sample_indices=indices, shared_memory=tensor_pb2.SharedMemory(region=region)
    )
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
            lambda b: b.batch.shared_memory.__setattr__("region", os.urandom(32)),
            grpc.StatusCode.NOT_FOUND,
            ["batch.shared_memory.region: no such region"],
        ),
    ],
    ids=["beyond-the-end", "negative", "offset-count", "no-segment", "unknown-region"],
)
def test_a_bad_shared_batch_is_refused_and_nothing_is_lost(
    client: pw.Client, stub: Any, images: list[np.ndarray], change: Any, code: grpc.StatusCode, fragments: list[str]
) -> None:
    with assembler(client, extr.SliceIndexing(0), entries={"__prediction": 2}) as asm:
        segment = shared_memory.Segment(1 << 20, sealed=True)
        try:
            with registered(stub, segment) as region:
                good = shared_batch(segment, asm.job_id, list(range(8)), images[0][:8], region)
                assert len(list(stub.PostPredictions(iter([good]), timeout=RPC_TIMEOUT_S))) == 1
                bad = shared_batch(segment, asm.job_id, list(range(8, 16)), images[0][8:16], region)
                change(bad)
                with expect_raw(code, *fragments):
                    list(stub.PostPredictions(iter([bad]), timeout=RPC_TIMEOUT_S))
                assert asm.status().received == 8, "the acknowledged batch is kept, the refused one not applied"
                rest = shared_batch(segment, asm.job_id, list(range(8, 24)), images[0][8:24], region)
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
            with registered(stub, segment, for_posting=False) as region:
                request = apb.FetchSubjectRequest(
                    job_id=asm.job_id, subject_index=1, shared_memory=tensor_pb2.SharedMemory(region=region)
                )
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
def test_a_server_in_another_process(
    h5: Path, tmp_path: Path, extra_args: tuple[str, ...], shared: bool, mapped: list[str]
) -> None:
    """The segments cross a process boundary as they do in deployment: the client hands its descriptors over the
    server's socket, and collects and maps the server's result files; ``--no-shared-memory`` keeps it to the wire."""
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
            if "--state-dir" in extra_args:  # result files, collected over the socket (small volumes: copied)
                assert len(mapped) == 3 and all(path.endswith(".npy") for path in mapped)
            else:
                assert mapped == []


def test_a_volume_in_the_memory_of_a_server_in_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept volume of 4 MiB and more is mapped from the memfd of a ``patchwire serve`` process (its descriptor
    collected over the socket, as in deployment) and its lease comes back; the server then reuses that memory for the
    next job."""
    shape = (64, 128, 64)  # x 2 channels of float32: 4 MiB, the server's smallest shared volume
    h5 = make_pymia_dataset(tmp_path, subjects=1, shape=shape)
    mapped: list[tuple[str, int]] = []
    real = shared_memory.map_descriptor

    def spy(fd: int, offset: int, nbytes: int) -> Any:
        mapped.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(shared_memory, "map_descriptor", spy)
    with server_subprocess({"big": h5}) as address, pw.connect(address) as c:
        ds = c.datasource("big", extr.EmptyIndexing(), IMAGES)
        image = ds[0]["images"]
        ds.close()
        assert image.nbytes == assembly_memory.SHARED_VOLUME_MIN_BYTES
        for _ in range(2):
            with assembler(c, extr.SliceIndexing(0)) as asm:
                for start in range(0, shape[0], 16):
                    asm.add_batch(image[start : start + 16], np.arange(start, start + 16))
                asm.flush()
                volume = asm.get_assembled_subject(0)
                np.testing.assert_array_equal(volume, image)
                assert mapped[-1][0].startswith("/memfd:patchwire-volume")
                del volume
                gc.collect()
            assert not process.LEASES.take(address), "the lease went back when the assembler closed"
        assert len(mapped) == 2 and mapped[0][1] == mapped[1][1], "the second job reused the first one's memfd"


def test_posting_through_shared_memory_survives_a_server_restart(h5: Path, tmp_path: Path) -> None:
    """A restarted server (same port and state folder) knows none of the regions of the one before: the assembler
    registers its segment again, also for the batches it sends again, and keeps posting through shared memory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ("--state-dir", str(tmp_path / "state"), "--port", str(port))
    with serve_process({"big": h5}, args) as (proc, address), pw.connect(address) as c:
        ds = c.datasource("big", extr.EmptyIndexing(), IMAGES)
        images = [ds[s]["images"] for s in range(3)]
        ds.close()
        ds = c.datasource("big", extr.SliceIndexing(0), IMAGES)
        asm = c.assembler(ds, window=3)
        order = np.arange(3 * SHAPE[0])
        batches = [order[start : start + 8] for start in range(0, len(order), 8)]
        for indices in batches[:4]:
            asm.add_batch(np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in indices]), indices)
        assert asm.uses_shared_memory
        proc.kill()
        proc.wait()
        with serve_process({"big": h5}, args) as (_, again):
            assert again == address
            try:
                for indices in batches[4:]:
                    asm.add_batch(np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in indices]), indices)
                asm.flush()
                assert asm.uses_shared_memory
                for s in range(3):
                    np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])
            finally:
                asm.close()
                ds.close()
