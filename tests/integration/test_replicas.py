"""Many servers: three ``patchwire serve`` replicas of the same datasets on loopback (each with its own
``--replica-id`` and ``--state-dir``), two training clients streaming the two shards of one shuffled epoch over all
three (gRPC's round_robin), and two clients posting predictions for an assembly job each, at the job's home replica.
Every sample arrives exactly once, in the order the one global epoch gives its shard, with the bytes a single server
serves; every assembled volume equals the predictions posted; ``patchwire status`` over the three lists each job
with its home. Then the same while the replica that serves a stream and is the home of a job is killed (SIGKILL)
mid-epoch and started again on its port and state folder: the stream resumes at its cursor on another replica, the
posting client waits for the home and finishes there.

The kill is placed, not timed: both training clients stop after their first batch with their streams still open (the
server sends messages of about 16 MiB and cannot send a shard's third one before the client has read its second),
the replica to kill is one that ``ListStreams`` shows serving one of them, and the posting clients have half of
their batches acknowledged when it dies.
"""

from __future__ import annotations

import hashlib
import io
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.cli import build_parser
from patchwire.cli.launch import Launched, launch_server
from patchwire.cli.status import run_status
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client._connection import Connection
from patchwire.client._replicas import Target
from patchwire.service._certs import make_dev_certs
from patchwire.v1 import server_service_pb2 as spb
from patchwire.v1 import server_service_pb2_grpc
from patchwire.wire.replicas import job_home

from _checks import Threads
from _datasets import make_pymia_dataset
from _servers import child_env, threaded_server

pytestmark = pytest.mark.slow

WAIT_S = 60  # for events between threads and for processes to start and exit: a bound, never a pace
REPLICAS = ("pw-0", "pw-1", "pw-2")
LARGE_SHAPE = (64, 128, 128)  # 128 KiB of images per slice: a shard (32 MiB) is more than a connection holds
LARGE_SUBJECTS = 8
SEED, EPOCH, BATCH = 17, 3, 4
PAUSE_AFTER = 1  # batches each training client takes before the replicas are looked at (and one is killed): the
# first message holds one batch, the next (16 MiB) then waits in the connection and the server cannot finish the third
RETRY = pw.RetryPolicy(budget_s=WAIT_S, initial_backoff_s=0.05, max_backoff_s=0.5)
ENTRY, CHANNELS = "seg", 2
SUBJECTS, SUBJECT_SAMPLES, SLICE = 3, 20, (24, 16)  # tiny_h5 sliced along axis 0
POST_BATCH = 3
STREAM_BATCHES = "/patchwire.v1.DatasetService/StreamBatches"


@pytest.fixture(scope="module")
def large_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pymia_dataset(tmp_path_factory.mktemp("large"), subjects=LARGE_SUBJECTS, shape=LARGE_SHAPE)


def _large(client: pw.Client) -> pw.RemoteDatasource:
    return client.datasource("large", extr.SliceIndexing(), extr.DataExtractor(), retry=RETRY)


def _digest(batch: dict[str, np.ndarray], k: int) -> str:
    return hashlib.blake2b(np.ascontiguousarray(batch[defs.KEY_IMAGES][k]).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Epoch:
    """The global epoch as one server streams it unsharded: sample indices in order, and each sample's bytes."""

    order: list[int]
    digests: dict[int, str]

    def shard(self, k: int) -> list[int]:
        return self.order[k::2]


@pytest.fixture(scope="module")
def epoch(large_h5: Path) -> Epoch:
    with threaded_server({"large": large_h5}) as handle, pw.connect(handle.server.address) as client:
        order: list[int] = []
        digests: dict[int, str] = {}
        for batch in _large(client).batches(BATCH, shuffle=True, seed=SEED, epoch=EPOCH):
            for k, i in enumerate(batch[defs.KEY_SAMPLE_INDEX]):
                order.append(int(i))
                digests[int(i)] = _digest(batch, k)
    assert sorted(order) == list(range(LARGE_SUBJECTS * LARGE_SHAPE[0]))
    return Epoch(order, digests)


class Replica:
    """One ``patchwire serve`` replica in a child process, which can be killed and started again on its port and
    state folder."""

    def __init__(self, datasets: dict[str, Path], replica_id: str, state: Path) -> None:
        self.datasets, self.replica_id, self.state = datasets, replica_id, state
        self.server: Launched | None = None
        self._stack = ExitStack()

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def start(self, port: int = 0) -> None:
        args = ["--replica-id", self.replica_id, "--state-dir", str(self.state), "--workers", "1", "--cache-mb", "64"]
        self._stack = ExitStack()
        # (stderr to this process's: a pipe nobody reads could fill and stall the server)
        self.server = self._stack.enter_context(
            launch_server(self.datasets, [*args, "--port", str(port)], env=child_env(), stderr=None)
        )

    def kill(self) -> None:
        assert self.server is not None
        self.server.process.send_signal(signal.SIGKILL)
        assert self.server.process.wait(timeout=WAIT_S) == -signal.SIGKILL
        self._stack.close()

    def stop(self) -> None:
        self._stack.close()


@contextmanager
def replicas(datasets: dict[str, Path], state: Path) -> Iterator[list[Replica]]:
    started = [Replica(datasets, r, state / r) for r in REPLICAS]
    try:
        for replica in started:
            replica.start()
        yield started
    finally:
        for replica in started:
            replica.stop()


def _serving_streams(replica: Replica) -> int:
    """How many StreamBatches calls the replica serves now (ListStreams)."""
    with grpc.insecure_channel(replica.address) as channel:
        response = server_service_pb2_grpc.ServerServiceStub(channel).ListStreams(
            spb.ListStreamsRequest(), timeout=WAIT_S
        )
    assert response.replica_id == replica.replica_id
    return sum(s.method == STREAM_BATCHES for s in response.streams)


def _prediction(i: int) -> np.ndarray:
    """The prediction for slice sample ``i`` of the tiny dataset: fixed by ``i`` alone."""
    return np.random.default_rng(3000 + i).standard_normal((*SLICE, CHANNELS), dtype=np.float32)


def _expected(subject: int) -> np.ndarray:
    first = subject * SUBJECT_SAMPLES
    return np.stack([_prediction(i) for i in range(first, first + SUBJECT_SAMPLES)])


def _post_batches(seed: int) -> list[list[int]]:
    """Every sample index of the tiny dataset once, shuffled across subjects, in batches."""
    order = [int(i) for i in np.random.default_rng(seed).permutation(SUBJECTS * SUBJECT_SAMPLES)]
    return [order[k : k + POST_BATCH] for k in range(0, len(order), POST_BATCH)]


@dataclass
class Run:
    """What the clients of one run saw."""

    delivered: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    """Training client -> (sample index, digest) in the order received."""
    stream_retries: dict[int, int] = field(default_factory=dict)
    jobs: dict[int, str] = field(default_factory=dict)
    """Posting client -> its job id."""
    posted: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    """Posting client -> (accepted, duplicate samples, batches sent again)."""


def _run(
    addresses: Sequence[str],
    choose_jobs: Callable[[], dict[int, str | None]],
    between: Callable[[Callable[[], None]], None],
) -> Run:
    """Two training clients take PAUSE_AFTER batches of their shard and wait; ``choose_jobs()`` gives the posting
    clients' job ids (None: the assembler names a new job), which post half their batches and wait; then
    ``between(resume)`` runs (a kill, say), which lets everyone go on by calling ``resume()``; everyone finishes."""
    run = Run()
    streaming = threading.Barrier(3, timeout=WAIT_S)
    posting = threading.Barrier(3, timeout=WAIT_S)
    resume = threading.Event()
    threads = Threads()

    def train(k: int) -> None:
        delivered = run.delivered.setdefault(k, [])
        with pw.connect(addresses) as client:
            ds = _large(client)
            stream = ds.batches(BATCH, shuffle=True, seed=SEED, epoch=EPOCH, shard_index=k, shard_count=2, prefetch=0)
            for n, batch in enumerate(stream, 1):
                delivered.extend((int(i), _digest(batch, j)) for j, i in enumerate(batch[defs.KEY_SAMPLE_INDEX]))
                if n == PAUSE_AFTER:
                    streaming.wait()
                    assert resume.wait(timeout=WAIT_S)
            run.stream_retries[k] = ds.retries
            ds.close()

    def post(c: int, job_id: str | None) -> None:
        batches = _post_batches(seed=c)
        with pw.connect(addresses) as client:
            ds = client.datasource("tiny", extr.SliceIndexing())
            with client.assembler(
                ds, "average", job_id=job_id, entries={ENTRY: CHANNELS}, window=1 + c, retry=RETRY
            ) as assembler:
                run.jobs[c] = assembler.job_id or ""
                for n, indices in enumerate(batches):
                    if n == len(batches) // 2:
                        assembler.flush()
                        posting.wait()
                        assert resume.wait(timeout=WAIT_S)
                    assembler.add_batch({ENTRY: np.stack([_prediction(i) for i in indices])}, indices)
                assembler.flush()
                run.posted[c] = (assembler.accepted_samples, assembler.duplicate_samples, assembler.resent_batches)
            ds.close()

    for k in range(2):
        threads.start(lambda k=k: train(k))  # type: ignore[misc]
    streaming.wait()
    job_ids = choose_jobs()
    for c in range(2):
        threads.start(lambda c=c: post(c, job_ids[c]))  # type: ignore[misc]
    posting.wait()
    try:
        between(resume.set)
    finally:
        resume.set()
    threads.join(WAIT_S * 3)
    return run


def _check_samples(run: Run, epoch: Epoch) -> None:
    for k in range(2):
        indices = [i for i, _ in run.delivered[k]]
        assert indices == epoch.shard(k)  # each sample once, in the global epoch's order for this shard
        assert all(digest == epoch.digests[i] for i, digest in run.delivered[k])  # the bytes one server serves


def _check_volumes(addresses: Sequence[str], run: Run) -> list[pw.JobStatus]:
    statuses = []
    with pw.connect(addresses) as client:
        ds = client.datasource("tiny", extr.SliceIndexing())
        for c, job_id in run.jobs.items():
            accepted, duplicates, resent = run.posted[c]
            assert accepted == SUBJECTS * SUBJECT_SAMPLES  # each sample accepted once
            assert duplicates <= resent * POST_BATCH  # duplicates only from batches sent again
            status = client.job_status(job_id)
            assert (status.state, status.received, status.ready_subject_count) == ("completed", 60, SUBJECTS)
            assert status.home == job_home(job_id) and status.journalled
            statuses.append(status)
            with client.assembler(ds, "average", job_id=job_id, entries={ENTRY: CHANNELS}) as assembler:
                for subject in range(SUBJECTS):
                    volume = assembler.get_assembled_subject(subject)[ENTRY]
                    assert volume.dtype == np.float32
                    np.testing.assert_array_equal(volume, _expected(subject))
                events = list(assembler.events())  # from the home, past events first, until job_completed
                assert [e.sequence for e in events] == list(range(1, len(events) + 1))
                assert sorted(e.subject_index for e in events if e.type == "subject_ready") == list(range(SUBJECTS))
        ds.close()
    return statuses


def _status(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert run_status(build_parser().parse_args(["status", *args]), out, err) == 0, err.getvalue()
    return out.getvalue()


def test_replicas_deliver_every_sample_once_and_every_volume_exact(
    large_h5: Path, tiny_h5: Path, epoch: Epoch, tmp_path: Path
) -> None:
    with replicas({"large": large_h5, "tiny": tiny_h5}, tmp_path) as started:
        addresses = [r.address for r in started]
        with pw.connect(addresses) as client:
            assert client.replicas() == {r.replica_id: r.address for r in started}
            assert client.address == ",".join(addresses)
        run = _run(addresses, lambda: {0: None, 1: None}, lambda resume: resume())  # the assemblers name new jobs
        _check_samples(run, epoch)
        assert all(job_home(j) in REPLICAS for j in run.jobs.values())  # named '<replica>.<hex>'
        statuses = _check_volumes(addresses, run)

        table = _status(*addresses)
        for status in statuses:
            (row,) = [line for line in table.splitlines() if line.startswith(status.job_id)]
            assert row.split()[1:4] == [status.home, "tiny", "completed"]
        assert table.splitlines()[-1] == "replicas: " + ", ".join(f"{r.replica_id} at {r.address}" for r in started)
        one = _status(",".join(addresses), "--job", run.jobs[0])
        assert one.startswith(f"job {run.jobs[0]} on tiny (home {job_home(run.jobs[0])}): completed, ")


def test_replicas_keep_exactly_once_and_exact_volumes_when_one_is_killed_and_restarted(
    large_h5: Path, tiny_h5: Path, epoch: Epoch, tmp_path: Path
) -> None:
    with replicas({"large": large_h5, "tiny": tiny_h5}, tmp_path) as started:
        addresses = [r.address for r in started]
        chosen: dict[str, Replica] = {}

        def choose_jobs() -> dict[int, str | None]:
            # the training clients are paused mid-epoch: the replica to kill serves one of their streams
            serving = [r for r in started if _serving_streams(r) > 0]
            assert serving, "no replica serves a stream: the epoch fits in what a connection buffers"
            victim = chosen["victim"] = serving[0]
            other = next(r for r in started if r is not victim)
            return {0: f"{victim.replica_id}.job-a", 1: f"{other.replica_id}.job-b"}  # client-chosen, homed by name

        def kill_and_restart(resume: Callable[[], None]) -> None:
            victim = chosen["victim"]
            port = victim.server.port if victim.server is not None else 0
            victim.kill()
            resume()  # the clients go on while the replica is away
            victim.start(port)  # the same port and state folder: its journalled job is back
            assert victim.address == addresses[started.index(victim)]

        run = _run(addresses, choose_jobs, kill_and_restart)
        _check_samples(run, epoch)
        assert sum(run.stream_retries.values()) >= 1  # a stream did break, and resumed on another replica
        assert run.jobs[0].startswith(chosen["victim"].replica_id + ".")
        assert run.posted[0][2] >= 1  # the posting client met its home's death: batches were sent again
        _check_volumes(addresses, run)
        table = _status(f"{addresses[0]},{addresses[1]},{addresses[2]}")
        assert sorted(line.split()[:2] for line in table.splitlines()[1:-1]) == sorted(
            [job_id, job_home(job_id)] for job_id in run.jobs.values()
        )


def test_replicas_over_tls_by_list_and_by_dns_name(tiny_h5: Path, tmp_path: Path) -> None:
    certs = make_dev_certs(tmp_path / "certs")  # valid for localhost, 127.0.0.1 and ::1
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "auth_config": certs.auth_config}
    credentials = pw.Credentials.make(certs.tokens["writer"], certs.ca_cert)
    with ExitStack() as stack:
        handles = [
            stack.enter_context(threaded_server({"tiny": tiny_h5}, replica_id=r, state_dir=tmp_path / r, **tls))
            for r in REPLICAS[:2]
        ]
        ports = [h.server.port for h in handles]
        by_list = [f"127.0.0.1:{p}" for p in ports]  # (each replica's certificate checked against 127.0.0.1)
        with pw.connect(by_list, credentials=credentials) as client:
            assert client.replicas() == {REPLICAS[0]: by_list[0], REPLICAS[1]: by_list[1]}
            ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor())
            assert sorted(int(i) for b in ds.batches(8) for i in b[defs.KEY_SAMPLE_INDEX]) == list(range(60))
            with client.assembler(ds, entries={ENTRY: CHANNELS}) as assembler:
                indices = list(range(SUBJECT_SAMPLES))
                assembler.add_batch({ENTRY: np.stack([_prediction(i) for i in indices])}, indices)
                home = job_home(assembler.job_id or "")
                assert home in REPLICAS[:2] and assembler.status().subjects[0].state == "ready"
                np.testing.assert_array_equal(assembler.get_assembled_subject(0)[ENTRY], _expected(0))
            assert [j.home for j in client.jobs()] == [home]
            ds.close()
        with pw.connect(f"dns:///localhost:{ports[1]}", credentials=credentials) as client:  # checked as localhost
            assert client.replicas() == {REPLICAS[1]: f"127.0.0.1:{ports[1]}"}  # (::1 may resolve too: not bound)
            assert client.datasets() == ["tiny"]


@dataclass(frozen=True)
class MovingTarget(Target):
    """A DNS name whose addresses the test sets (a restarted pod's new address, without a DNS server)."""

    now: list[str] = field(default_factory=list)

    def resolve(self) -> list[str]:
        return list(self.now)

    def channel_target(self) -> str:
        return "ipv4:" + ",".join(self.now)


def test_a_home_restarted_at_a_new_address_is_found_again(tiny_h5: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    target = MovingTarget(dns_name="moving.test", port=1)
    batches = _post_batches(seed=9)
    with threaded_server({"tiny": tiny_h5}, replica_id="pw-1", state_dir=state) as first:
        target.now.append(first.server.address)
        with pw.connect(first.server.address) as client:
            ds = client.datasource("tiny", extr.SliceIndexing())
        assembler = pw.RemoteSubjectAssembler(
            Connection(target), ds, "average", job_id="pw-1.moved", entries={ENTRY: CHANNELS}, retry=RETRY
        )
        for indices in batches[: len(batches) // 2]:
            assembler.add_batch({ENTRY: np.stack([_prediction(i) for i in indices])}, indices)
    with threaded_server({"tiny": tiny_h5}, replica_id="pw-1", state_dir=state) as second:
        assert second.server.address != first.server.address
        target.now[:] = [second.server.address]  # the name now resolves to where the home answers
        for indices in batches[len(batches) // 2 :]:
            assembler.add_batch({ENTRY: np.stack([_prediction(i) for i in indices])}, indices)
        assembler.flush()
        assert assembler.resent_batches >= 1 and assembler.accepted_samples == SUBJECTS * SUBJECT_SAMPLES
        assert assembler.status().state == "completed"
        for subject in range(SUBJECTS):
            np.testing.assert_array_equal(assembler.get_assembled_subject(subject)[ENTRY], _expected(subject))
        assembler.close()
    ds.close()
