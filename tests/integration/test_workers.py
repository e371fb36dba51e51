"""``patchwire serve --workers 2``: real servers of several processes on one port 0, against clients whose connections
are made to land on chosen workers (each channel here gets a connection of its own, and GetServerInfo names the
worker that holds it).

Samples streamed from two workers are those of a single process; an assembly job made through one worker is posted to
and fetched through the other, through shared memory from this host; sample reads through shared memory work on any
worker; an identity header sent to the public port gains nothing; a killed worker is started again (with a state
folder, the jobs of a killed home come back) and the server keeps serving; SIGTERM stops every worker and removes the
private run folder; a port in use and a dataset that cannot be served end the server with the worker's error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.cli.launch import Launched, launch_server, serve_command
from patchwire.client import _connection
from patchwire.client import extraction as extr
from patchwire.service._auth import Identity, token_digest
from patchwire.service._forwarding import IDENTITY_METADATA, encode_identity
from patchwire.v1 import assembly_service_pb2 as apb
from patchwire.v1 import assembly_service_pb2_grpc, server_service_pb2_grpc
from patchwire.v1 import server_service_pb2 as spb
from patchwire.wire import framing, shared_memory, tensors

from _datasets import make_pymia_dataset
from _servers import child_env, server_in_thread

SHAPE = (24, 40, 36)
IMAGES = extr.DataExtractor(categories=("images",))
WORKERS = 2
TIMEOUT_S = 30
T = TypeVar("T")


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pymia_dataset(tmp_path_factory.mktemp("workers"), shape=SHAPE)


@pytest.fixture(scope="module")
def server(h5: Path) -> Iterator[Launched]:
    with launch_server({"big": h5}, ["--workers", str(WORKERS)], env=child_env()) as launched:
        yield launched


@pytest.fixture(autouse=True)
def own_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client channel of this process gets a TCP connection of its own (gRPC shares one between channels of
    the same target and options), so that connections spread over the workers as those of separate processes do."""
    monkeypatch.setattr(
        _connection, "RECONNECT_OPTIONS", [*_connection.RECONNECT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )


def raw_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[*framing.channel_options(), ("grpc.use_local_subchannel_pool", 1)])


def worker_of(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    info = server_service_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
        spb.GetServerInfoRequest(), timeout=TIMEOUT_S, metadata=metadata
    )
    assert info.workers == WORKERS
    return info.worker_index


def landing_on(
    worker: int,
    make: Callable[[], T],
    channel_of: Callable[[T], grpc.Channel],
    close: Callable[[T], None],
    metadata: tuple[tuple[str, str], ...] = (),
) -> T:
    """``make()`` again until what it made is connected to ``worker`` (the kernel spreads connections over the
    listening workers: one of two lands on each; a worker started again listens only once it has opened its
    datasets, so tries go on for up to a minute, also past connections reset meanwhile); ``metadata``: credentials
    for GetServerInfo."""
    deadline = time.monotonic() + 60.0
    tries = 0
    while tries < 64 or time.monotonic() < deadline:
        tries += 1
        made = make()
        try:
            if worker_of(channel_of(made), metadata) == worker:
                return made
        except grpc.RpcError as exc:  # a connection the kernel queued on a worker as it died is reset: try again
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        close(made)
    raise AssertionError(f"no connection reached worker {worker} in {tries} tries over a minute")


def raw_on(address: str, worker: int, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.Channel:
    return landing_on(worker, lambda: raw_channel(address), lambda c: c, lambda c: c.close(), metadata)


def client_on(address: str, worker: int) -> pw.Client:
    return landing_on(worker, lambda: pw.connect(address), lambda c: c._connection.channel, lambda c: c.close())


def assembler_on(worker: int, client: pw.Client, datasource: pw.RemoteDatasource, **kwargs: Any) -> Any:
    return landing_on(
        worker,
        lambda: client.assembler(datasource, **kwargs),
        lambda asm: asm._connection.channel,
        lambda asm: asm.close(),
    )


def eventually(check: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """The first true result of ``check()``, asked again until ``timeout``: for a worker that is starting again."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
    return found


# -- serving -----------------------------------------------------------------------------------------------------


def test_every_worker_serves_and_each_connection_stays_with_one(server: Launched) -> None:
    seen = set()
    for _ in range(64):
        with raw_channel(server.address) as channel:
            index = worker_of(channel)
            assert [worker_of(channel) for _ in range(3)] == [index] * 3, "one channel, one connection, one worker"
            seen.add(index)
        if seen == set(range(WORKERS)):
            break
    assert seen == set(range(WORKERS))
    assert len(children(server.process.pid)) == WORKERS


def test_clients_on_different_workers_stream_the_samples_of_one_process(server: Launched, h5: Path) -> None:
    """Two consumers, one per worker, stream their shards of a shuffled epoch: each gets exactly what it gets from a
    server of one process."""
    indexing = extr.PatchWiseIndexing((8, 16, 12))
    clients = [client_on(server.address, w) for w in range(WORKERS)]
    try:
        with server_in_thread({"big": h5}) as single, pw.connect(single.address) as reference:
            expected_ds = reference.datasource("big", indexing, IMAGES)
            for shard, client in enumerate(clients):
                ds = client.datasource("big", indexing, IMAGES)
                kw = {"batch_size": 5, "shuffle": True, "seed": 11, "shard_index": shard, "shard_count": WORKERS}
                got = list(ds.batches(**kw))
                expected = list(expected_ds.batches(**kw))
                assert len(got) == len(expected) > 0
                for a, b in zip(got, expected, strict=True):
                    np.testing.assert_array_equal(a["sample_index"], b["sample_index"])
                    np.testing.assert_array_equal(a["images"], b["images"])
                ds.close()
            expected_ds.close()
    finally:
        for client in clients:
            client.close()


@pytest.mark.skipif(not shared_memory.available(), reason="shared memory needs Linux with memfd_create")
def test_samples_read_through_shared_memory_on_any_worker_equal_the_wire(server: Launched) -> None:
    for worker in range(WORKERS):
        with client_on(server.address, worker) as client:
            shared = client.datasource("big", extr.SliceIndexing(0), IMAGES)
            wire = client.datasource("big", extr.SliceIndexing(0), IMAGES, shared_memory=False)
            for indices in ([0], [5, 3, 40], list(range(0, 72, 7))):
                for a, b in zip(shared.get_samples(indices), wire.get_samples(indices), strict=True):
                    np.testing.assert_array_equal(a["images"], b["images"])
            assert shared.uses_shared_memory is True, f"worker {worker}: the samples came through shared memory"
            shared.close()
            wire.close()


# -- assembly: one home -------------------------------------------------------------------------------------------


def _post(asm: Any, images: list[np.ndarray], indices: range) -> None:
    for start in range(indices.start, indices.stop, 8):
        chunk = np.arange(start, min(start + 8, indices.stop))
        asm.add_batch(np.stack([images[i // SHAPE[0]][i % SHAPE[0]] for i in chunk]), chunk)
    asm.flush()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "wire"])
def test_a_job_made_through_one_worker_is_posted_and_fetched_through_another(server: Launched, shared: bool) -> None:
    """Worker 1 forwards every call of the job to worker 0; the job is one, whichever worker a client reaches: half
    of the predictions come through each, and every volume is exact."""
    with pw.connect(server.address) as client:
        reader = client.datasource("big", extr.EmptyIndexing(), IMAGES)
        images = [reader[s]["images"] for s in range(3)]
        reader.close()
        ds = client.datasource("big", extr.SliceIndexing(0), IMAGES)
        first = assembler_on(1, client, ds, shared_memory=shared)
        _post(first, images, range(0, 36))
        job_id = first.job_id
        assert job_id is not None
        second = assembler_on(0, client, ds, job_id=job_id, shared_memory=shared)
        _post(second, images, range(36, 72))
        try:
            for asm in (first, second):
                assert asm.uses_shared_memory == shared
                for s in range(3):
                    np.testing.assert_array_equal(asm.get_assembled_subject(s), images[s])
                statistics = asm.transport.statistics
                if shared:
                    assert statistics.posted_wire_bytes == 0 and statistics.fetched_wire_bytes == 0
            for worker in range(WORKERS):  # the same job, as either worker tells it
                with raw_on(server.address, worker) as channel:
                    stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
                    status = stub.GetJobStatus(apb.GetJobStatusRequest(job_id=job_id), timeout=TIMEOUT_S)
                    assert status.job.received_samples == 72
        finally:
            first.close()
            second.close()
            second.delete()
            ds.close()


def test_status_codes_and_details_of_the_home_reach_a_client_of_another_worker(server: Launched) -> None:
    with raw_on(server.address, 1) as channel:
        stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.GetJobStatus(apb.GetJobStatusRequest(job_id="no-such-job"), timeout=TIMEOUT_S)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-job" in unknown.value.details()


# -- identities ---------------------------------------------------------------------------------------------------

TOKENS = {"writer": "writer-token-0123456789abcdef", "reader": "reader-token-0123456789abcdef"}


@pytest.fixture(scope="module")
def authenticated(h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """Two workers with identities (plaintext: the tokens stay on loopback): writer (write), reader (read)."""
    auth = tmp_path_factory.mktemp("auth") / "auth.toml"
    lines = []
    for name, role in (("writer", "write"), ("reader", "read")):
        lines += ["[[identity]]", f'name = "{name}"', f'roles = ["{role}"]']
        lines.append(f'token_sha256 = "{token_digest(TOKENS[name]).hex()}"')
    auth.write_text("\n".join(lines) + "\n")
    args = ["--workers", str(WORKERS), "--auth-config", str(auth)]
    with launch_server({"big": h5}, args, env=child_env()) as launched:
        yield launched


def _bearer(name: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {TOKENS[name]}")


def test_an_identity_header_sent_to_the_public_port_gains_nothing(authenticated: Launched) -> None:
    forged = (IDENTITY_METADATA, encode_identity(Identity("writer", frozenset({"admin"}))))
    create = apb.CreateJobRequest(job_id="forged-job")
    create.spec.dataset = "big"
    for worker in range(WORKERS):
        with raw_on(authenticated.address, worker, (_bearer("reader"),)) as channel:
            stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
            for metadata, code in (
                ((forged,), grpc.StatusCode.UNAUTHENTICATED),
                ((forged, _bearer("reader")), grpc.StatusCode.PERMISSION_DENIED),
            ):
                for call, request in ((stub.CreateJob, create), (stub.ListJobs, apb.ListJobsRequest())):
                    with pytest.raises(grpc.RpcError) as refused:
                        call(request, timeout=TIMEOUT_S, metadata=metadata)
                    assert refused.value.code() == code, (worker, metadata, call)


def test_a_forwarded_call_acts_as_the_authenticated_caller(authenticated: Launched) -> None:
    """writer's job, made through worker 1 (forwarded): it belongs to writer, whom worker 0 then sees as its owner,
    and whom neither a reader nor a forged header can replace."""
    request = apb.CreateJobRequest(
        overlap_mode=apb.OVERLAP_MODE_OVERWRITE,
        entries=[apb.OutputEntry(name="seg", channels=1, dtype=tensors.dtype_to_proto(np.dtype("float32")))],
    )
    request.spec.dataset = "big"
    request.spec.indexing_strategy.slice.slice_axis.append(0)
    with raw_on(authenticated.address, 1, (_bearer("writer"),)) as channel:
        created = assembly_service_pb2_grpc.AssemblyServiceStub(channel).CreateJob(
            request, timeout=TIMEOUT_S, metadata=(_bearer("writer"),)
        )
    job_id = created.job.job_id
    with raw_on(authenticated.address, 0, (_bearer("writer"),)) as channel:
        stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
        jobs = stub.ListJobs(apb.ListJobsRequest(), timeout=TIMEOUT_S, metadata=(_bearer("writer"),))
        assert [j.job_id for j in jobs.jobs] == [job_id]
        stub.DeleteJob(apb.DeleteJobRequest(job_id=job_id), timeout=TIMEOUT_S, metadata=(_bearer("writer"),))


# -- the processes' lives -----------------------------------------------------------------------------------------


def test_killed_workers_are_started_again_and_the_home_keeps_its_jobs(h5: Path, tmp_path: Path) -> None:
    """Each worker in turn is killed (SIGKILL): the server keeps answering through the other, the supervisor starts
    it again on the same port, and with a state folder the job made before comes back with the home."""
    args = ["--workers", str(WORKERS), "--state-dir", str(tmp_path / "state")]
    with launch_server({"big": h5}, args, env=child_env()) as launched, pw.connect(launched.address) as client:
        reader = client.datasource("big", extr.EmptyIndexing(), IMAGES)
        images = [reader[s]["images"] for s in range(3)]
        ds = client.datasource("big", extr.SliceIndexing(0), IMAGES)
        asm = client.assembler(ds)
        _post(asm, images, range(72))
        job_id = asm.job_id
        asm.close()
        for victim in sorted(children(launched.process.pid)):
            os.kill(victim, signal.SIGKILL)
            others = children(launched.process.pid) - {victim}
            eventually(
                lambda others=others: len(children(launched.process.pid) - others) == 1,  # type: ignore[misc]
                "the supervisor starts it again",
            )
            for worker in range(WORKERS):  # both serve again, on the same port
                with raw_on(launched.address, worker) as channel:
                    stub = assembly_service_pb2_grpc.AssemblyServiceStub(channel)
                    status = stub.GetJobStatus(
                        apb.GetJobStatusRequest(job_id=job_id), timeout=TIMEOUT_S, wait_for_ready=True
                    )
                    assert status.job.received_samples == 72
            assert len(reader.get_samples([0, 1, 2])) == 3
        again = client.assembler(ds, job_id=job_id)
        for s in range(3):
            arrays, _ = again.fetch(s)
            np.testing.assert_array_equal(arrays["__prediction"], images[s])
        again.delete()
        reader.close()
        ds.close()
    assert launched.process.returncode == 0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path (the run folder moves to /tmp where Unix socket paths would not fit)."""
    path = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_sigterm_stops_every_worker_and_removes_the_run_folder(h5: Path, short_tmp: Path) -> None:
    tmp_path = short_tmp
    env = {**child_env(), "TMPDIR": str(tmp_path)}
    with launch_server({"big": h5}, ["--workers", str(WORKERS)], env=env) as launched:
        workers = children(launched.process.pid)
        assert len(workers) == WORKERS
        (run_dir,) = tmp_path.glob("patchwire-run-*")
        assert (run_dir / "home.sock").exists() and run_dir.stat().st_mode & 0o777 == 0o700
        launched.process.send_signal(signal.SIGTERM)
        assert launched.process.wait(timeout=TIMEOUT_S) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), "a worker outlived the server"
    assert not run_dir.exists()
    assert not list(tmp_path.glob("patchwire-*")), "the workers' folders (run, shared memory, state) are gone"


def test_a_port_in_use_ends_the_server_with_status_1(h5: Path, server: Launched) -> None:
    command = serve_command({"big": h5}, "--workers", str(WORKERS), "--port", str(server.port))
    ended = subprocess.run(command, capture_output=True, text=True, timeout=120, env=child_env())
    assert ended.returncode == 1
    assert ended.stdout == ""
    assert f"patchwire serve: cannot bind 127.0.0.1:{server.port}: Address already in use" in ended.stderr


def test_a_dataset_that_cannot_be_served_ends_the_server_with_the_workers_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not HDF5")
    ends = {}
    for workers in (1, WORKERS):
        command = serve_command({"broken": broken}, "--workers", str(workers))
        ended = subprocess.run(command, capture_output=True, text=True, timeout=120, env=child_env())
        assert ended.returncode == 1 and ended.stdout == ""
        ends[workers] = [line for line in ended.stderr.splitlines() if line.startswith("patchwire serve: ")]
    assert ends[WORKERS] == ends[1]
    assert "(no dataset can be served)" in ends[1][0]
