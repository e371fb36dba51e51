"""Durability and memory of server-side assembly.

Durability: a ``patchwire serve`` subprocess with ``--state-dir`` is killed with SIGKILL in the middle of a job and
restarted on the same folder; everything acknowledged is back (received counts, subject states, events), posting
continues, re-posted batches count as duplicates and are not applied twice, and the volumes come out exact. Torn
journal tails, a lost subject-ready event and a torn event line, all made while the server is down, are repaired
on restart. A ready subject is fetched without waiting for its volume to be synced; a server without a state folder
journals and syncs nothing.

Memory: partial volumes live in memory-mapped files and at most ``assembly_memory_bytes`` of them are mapped at once
(a single subject larger than that is mapped alone), checked after every batch with all subjects in flight.

Long because each scenario needs its own crash, restart and repair on a subprocess server; the journal, subjects and
memory pool alone are unit-tested in ``tests/unit/service/assembly``.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.service import PatchwireServer
from patchwire.service._pymia_format import SubjectRecord, write_pymia_dataset
from patchwire.service.assembly import job as job_module
from patchwire.service.assembly import journal as journal_module
from patchwire.service.assembly import persistence as persistence_module
from patchwire.service.assembly.journal import Journal
from patchwire.wire.geometry import ImageProperties

from _servers import serve_process, server_in_thread

EXIT_TIMEOUT_S = 30
JOB = "durable"
ENTRY = "seg"
CHANNELS = 2
SUBJECT_SAMPLES = 20  # tiny_h5: 3 subjects of 20x24x16, SliceIndexing along axis 0
SLICE_SHAPE = (24, 16)


# -- helpers: the tiny job ------------------------------------------------------------------------------------------


def _prediction(i: int, offset: float = 0.0) -> np.ndarray:
    """The prediction for slice sample ``i``: fixed by ``i`` alone, so any client can recompute it."""
    rng = np.random.default_rng(1000 + i)
    return (rng.standard_normal((*SLICE_SHAPE, CHANNELS), dtype=np.float32) + np.float32(offset)).astype(np.float32)


def _batch(indices: Sequence[int], offset: float = 0.0) -> dict[str, np.ndarray]:
    return {ENTRY: np.stack([_prediction(i, offset) for i in indices])}


def _expected(subject: int) -> np.ndarray:
    first = subject * SUBJECT_SAMPLES
    return np.stack([_prediction(i) for i in range(first, first + SUBJECT_SAMPLES)])


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[k : k + size]) for k in range(0, len(indices), size)]


def _plan() -> tuple[list[list[int]], list[list[int]]]:
    """Batches posted before the crash (subject 0 whole, subject 1 half, subject 2 a quarter, shuffled across
    subjects) and after it (the rest)."""
    rng = np.random.default_rng(0)
    first = [int(i) for i in rng.permutation([*range(0, 30), *range(40, 45)])]
    rest = [int(i) for i in rng.permutation([*range(30, 40), *range(45, 60)])]
    return _chunks(first, 7), _chunks(rest, 6)


FIRST, REST = _plan()


def _spans_subjects(batch: Sequence[int]) -> bool:
    return len({i // SUBJECT_SAMPLES for i in batch}) > 1


def _post(assembler: pw.RemoteSubjectAssembler, indices: Sequence[int], offset: float = 0.0) -> Any:
    """Posts one batch and returns the server's acknowledgement (accepted and duplicate counts)."""
    before = (assembler.accepted_samples, assembler.duplicate_samples)
    assembler.add_batch(_batch(indices, offset), list(indices))  # (window 1: returns with the acknowledgement)
    return SimpleNamespace(
        accepted_samples=assembler.accepted_samples - before[0],
        duplicate_samples=assembler.duplicate_samples - before[1],
    )


def _events(assembler: pw.RemoteSubjectAssembler, count: int) -> list[pw.AssemblyEvent]:
    """The first ``count`` events (the stream stays open for live ones; it is closed after ``count``)."""
    stream = assembler.events()
    try:
        return list(itertools.islice(stream, count))
    finally:
        stream.close()


def _comparable(status: pw.JobStatus) -> pw.JobStatus:
    """A status without the one field that depends on what happens to be mapped."""
    return dataclasses.replace(status, resident_buffer_bytes=0)


@contextmanager
def _serve(h5: Path, state: Path) -> Iterator[tuple[subprocess.Popen[str], pw.Client, pw.RemoteDatasource]]:
    with (
        serve_process({"tiny": h5}, ("--state-dir", str(state))) as (proc, address),
        pw.connect(address) as client,
    ):
        yield proc, client, client.datasource("tiny", extr.SliceIndexing())


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no signal handler, no graceful stop, nothing flushed
    assert proc.wait(timeout=EXIT_TIMEOUT_S) == -9


def _journal(state: Path, subject: int) -> Path:
    return state / "jobs" / JOB / "journals" / f"{subject}.journal"


def _start_and_crash(h5: Path, state: Path) -> tuple[pw.JobStatus, list[pw.AssemblyEvent]]:
    """Creates the job, posts FIRST, reads status and events, and kills the server."""
    with _serve(h5, state) as (proc, client, ds):
        assert [(s.first_sample_index, s.sample_count) for s in ds.subjects] == [(0, 20), (20, 20), (40, 20)]
        with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
            for batch in FIRST:
                assembler.add_batch(_batch(batch), batch)
            before = client.job_status(JOB, max_missing=100)
            events = _events(assembler, before.last_event_sequence)
        _kill(proc)
    assert [s.state for s in before.subjects] == ["ready", "in_progress", "in_progress"]
    assert [s.received for s in before.subjects] == [20, 10, 5]
    assert [(e.type, e.subject_index) for e in events] == [("subject_ready", 0)]
    return before, events


def _finish(
    client: pw.Client, ds: pw.RemoteDatasource, before: pw.JobStatus, repost: bool = True
) -> list[pw.AssemblyEvent]:
    """Checks that the restarted server has the job as it was, posts the rest (re-posting acknowledged batches with
    other values on the way), checks the volumes exactly and returns every event."""
    assert _comparable(client.job_status(JOB, max_missing=100)) == _comparable(before)
    with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
        rest = [list(b) for b in REST]
        if repost:
            # whole batches acknowledged before the crash, one of them for the finished subject: all duplicates,
            # and with other values, so that applying them (average mode) would change the volumes
            for batch in FIRST:
                ack = _post(assembler, batch, offset=100.0)
                assert (ack.accepted_samples, ack.duplicate_samples) == (0, len(batch))
            assert client.job_status(JOB).received == before.received
            # acknowledged and new samples in one batch: only the new ones count
            mixed = FIRST[1][:3] + rest[0]
            ack = _post(assembler, mixed)
            assert (ack.accepted_samples, ack.duplicate_samples) == (len(rest[0]), 3)
            rest = rest[1:]
        for batch in rest:
            assembler.add_batch(_batch(batch), batch)
        # a batch whose acknowledgement was lost, retried after the job completed: duplicates, not an error
        ack = _post(assembler, REST[-1], offset=100.0)
        assert (ack.accepted_samples, ack.duplicate_samples) == (0, len(REST[-1]))
        status = client.job_status(JOB)
        assert (status.state, status.received, status.ready_subject_count) == ("completed", 60, 3)
        for subject in range(3):
            volume = assembler.get_assembled_subject(subject)[ENTRY]
            assert volume.dtype == np.float32
            np.testing.assert_array_equal(volume, _expected(subject))
        return _events(assembler, status.last_event_sequence)


def _check_final_events(events: Sequence[pw.AssemblyEvent], first: Sequence[pw.AssemblyEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert sorted(e.subject_index for e in events if e.type == "subject_ready") == [0, 1, 2]
    assert [e.type for e in events].count("subject_ready") == 3
    assert events[-1].type == "job_completed"
    assert list(events[: len(first)]) == list(first)


# -- kill -9 --------------------------------------------------------------------------------------------------------


def test_plan_spans_subjects() -> None:
    assert sum(_spans_subjects(b) for b in FIRST) >= 3
    assert sum(_spans_subjects(b) for b in REST) >= 3
    assert sorted(i for b in FIRST + REST for i in b) == list(range(60))


@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged(tiny_h5: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    before, events = _start_and_crash(tiny_h5, state)
    with _serve(tiny_h5, state) as (_, client, ds):
        assert [j.job_id for j in client.jobs()] == [JOB]
        with client.assembler(ds, job_id=JOB, overlap="average", entries={ENTRY: CHANNELS}) as assembler:
            assert _events(assembler, len(events)) == events  # sequence, subject and time: exactly as before
        final = _finish(client, ds, before)
    _check_final_events(final, events)
    assert not any((state / "jobs" / JOB / "journals").iterdir())  # finished subjects leave no journal


@pytest.mark.slow
def test_torn_journal_tails_are_cut_off(tiny_h5: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    before, events = _start_and_crash(tiny_h5, state)
    sizes = {s: _journal(state, s).stat().st_size for s in (1, 2)}
    # records of samples that were never acknowledged (with other values, so applying them would show): for subject
    # 1 one whose payload was corrupted, then garbage; for subject 2 one whose last bytes never reached the disk
    scratch = Journal(tmp_path / "scratch.journal")
    scratch.append([30], {ENTRY: [_prediction(30, offset=100.0)]})
    corrupt = bytearray(scratch.path.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    with open(_journal(state, 1), "ab") as f:
        f.write(bytes(corrupt) + bytes(range(256)) * 3)
    scratch.delete()
    scratch.append([45], {ENTRY: [_prediction(45, offset=100.0)]})
    with open(_journal(state, 2), "ab") as f:
        f.write(scratch.path.read_bytes()[:-3])
    with _serve(tiny_h5, state) as (_, client, ds):
        # the status check inside _finish: sample 45 is not received; the tails are gone from the files
        assert {s: _journal(state, s).stat().st_size for s in (1, 2)} == sizes
        final = _finish(client, ds, before, repost=False)
    _check_final_events(final, events)


@pytest.mark.slow
def test_crash_between_result_and_event_emits_the_event_on_restart(tiny_h5: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    before, _ = _start_and_crash(tiny_h5, state)
    events_path = state / "jobs" / JOB / "events.jsonl"
    lines = events_path.read_text().splitlines(keepends=True)
    assert len(lines) == 1  # subject 0's result is on disk; its event is not
    events_path.write_text("".join(lines[:-1]))
    with _serve(tiny_h5, state) as (_, client, ds):
        with client.assembler(ds, job_id=JOB, overlap="average", entries={ENTRY: CHANNELS}) as assembler:
            (again,) = _events(assembler, 1)
        assert (again.sequence, again.type, again.subject_index, again.subject) == (1, "subject_ready", 0, "Subject_1")
        final = _finish(client, ds, before, repost=False)
    _check_final_events(final, [again])


@pytest.mark.slow
def test_torn_event_line_is_cut_off(tiny_h5: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    before, events = _start_and_crash(tiny_h5, state)
    with open(state / "jobs" / JOB / "events.jsonl", "a") as f:
        f.write('{"sequence": 2, "type": 1, "subj')  # an event whose write was cut short by the crash
    with _serve(tiny_h5, state) as (proc, client, ds):
        final = _finish(client, ds, before, repost=False)
        _kill(proc)
    _check_final_events(final, events)
    # the events written after the torn line survive another restart unchanged
    with _serve(tiny_h5, state) as (_, client, ds):
        status = client.job_status(JOB)
        assert (status.state, status.last_event_sequence) == ("completed", len(final))
        with client.assembler(ds, job_id=JOB, overlap="average", entries={ENTRY: CHANNELS}) as assembler:
            assert _events(assembler, len(final)) == final


class _Crash(Exception):
    """Stands for the process dying at the point where it is raised."""


@pytest.mark.parametrize("marker_written", [False, True], ids=["before-forced-marker", "after-forced-marker"])
def test_crash_inside_a_forced_finish(
    tiny_h5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker_written: bool
) -> None:
    """A last batch forces the partial subjects ready; the server dies while writing the first one's "forced"
    marker (before or after it is durable). The batch was never acknowledged: after a restart the subjects are in
    progress exactly as before, and a stale marker does not make a subject that later completes look forced."""
    state = tmp_path / "state"
    write_atomic = job_module.write_atomic

    def crashing(path: Path, data: bytes) -> None:
        if path.name.endswith(".forced.npy"):
            if marker_written:
                write_atomic(path, data)
            raise _Crash(path.name)
        write_atomic(path, data)

    def status(client: pw.Client) -> list[tuple[str, bool, int, tuple[int, ...]]]:
        return [
            (s.state, s.forced, s.received, s.missing_sample_indices)
            for s in client.job_status(JOB, max_missing=100).subjects
        ]

    with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing())
        with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
            for batch in FIRST:
                assembler.add_batch(_batch(batch), batch)
            before = client.job_status(JOB, max_missing=100)
            monkeypatch.setattr(job_module, "write_atomic", crashing)
            with pytest.raises(pw.ServerError, match=r"forced\.npy"):
                assembler.add_batch(_batch(FIRST[0]), FIRST[0], last_batch=True)
            monkeypatch.undo()
    rest = [i for batch in REST for i in batch if i != 59]
    with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
        assert _comparable(client.job_status(JOB, max_missing=100)) == _comparable(before)
        ds = client.datasource("tiny", extr.SliceIndexing())
        with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
            assembler.add_batch(_batch(rest), rest, last_batch=True)  # all but sample 59: subject 2 is forced
            final = status(client)
            assert final == [
                ("ready", False, 20, ()),
                ("ready", False, 20, ()),
                ("ready", True, 19, (59,)),
            ]
            for subject in (0, 1):
                np.testing.assert_array_equal(assembler.get_assembled_subject(subject)[ENTRY], _expected(subject))
    with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
        assert status(client) == final


@pytest.mark.parametrize("failure", ["crash", "error"])
def test_a_ready_subject_whose_volume_was_not_written_is_finished_on_restart(
    tiny_h5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A subject is ready (acknowledged, event sent) once its last sample is journalled; its volume is written in the
    background. If the server dies before that ("crash": the write never happens) or the write fails ("error": a
    fetch reports it), the journal is still there and a restart finishes the subject again, with no second event."""
    state = tmp_path / "state"
    fsync_path = job_module.fsync_path

    def failing(path: Path) -> None:
        if path.name == "results":  # making the subject's new result file durable
            raise OSError(5, "Input/output error")
        fsync_path(path)

    with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
        if failure == "crash":
            monkeypatch.setattr(job_module.Job, "_finish_volume", lambda self, subject: None)
        else:
            monkeypatch.setattr(job_module, "fsync_path", failing)
        ds = client.datasource("tiny", extr.SliceIndexing())
        with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
            for batch in FIRST:
                assembler.add_batch(_batch(batch), batch)
            assert assembler.subjects_ready == {0}
            (event,) = _events(assembler, 1)
            if failure == "error":
                with pytest.raises(pw.ServerError, match=r"Input/output error.*journal is kept"):
                    assembler.get_assembled_subject(0)
        monkeypatch.undo()
    assert _journal(state, 0).exists()  # (the result file may be in place: its folder was not made durable)
    with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing())
        status = client.job_status(JOB)
        assert [(s.state, s.received) for s in status.subjects] == [
            ("ready", 20),
            ("in_progress", 10),
            ("in_progress", 5),
        ]
        with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
            np.testing.assert_array_equal(assembler.get_assembled_subject(0)[ENTRY], _expected(0))
            assert _events(assembler, status.last_event_sequence) == [event]  # the same event, not a second one
    assert not _journal(state, 0).exists()


def test_a_ready_subject_is_fetched_before_its_volume_is_durable(
    tiny_h5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overwrite mode: a ready subject's buffer is its volume and its journal already holds every sample, so a fetch
    does not wait while the background thread writes and syncs the volume; afterwards the volume is the result
    file."""
    state = tmp_path / "state"
    syncing, release = threading.Event(), threading.Event()
    write_npy = job_module.write_npy

    def held(path: Path, array: np.ndarray, sync: bool) -> None:
        if path.parent.name == "results":  # the finished subject's volume being made durable
            assert sync
            syncing.set()
            assert release.wait(EXIT_TIMEOUT_S)
        write_npy(path, array, sync)

    monkeypatch.setattr(job_module, "write_npy", held)
    try:
        with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
            ds = client.datasource("tiny", extr.SliceIndexing())
            with client.assembler(ds, overlap="overwrite", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
                subject = list(range(SUBJECT_SAMPLES))
                assembler.add_batch(_batch(subject), subject)
                assert assembler.subjects_ready == {0}
                assert syncing.wait(EXIT_TIMEOUT_S)
                result = state / "jobs" / JOB / "results" / f"0.{ENTRY}.npy"
                np.testing.assert_array_equal(assembler.get_assembled_subject(0)[ENTRY], _expected(0))
                assert not result.exists() and _journal(state, 0).exists()  # fetched while still being synced
                release.set()
                assert server.assembly is not None
                finished = server.assembly.get(JOB).subjects[0].finished
                assert finished is not None and finished.wait(EXIT_TIMEOUT_S)
                assert result.exists() and not _journal(state, 0).exists()
                np.testing.assert_array_equal(assembler.get_assembled_subject(0)[ENTRY], _expected(0))
    finally:
        release.set()


def test_without_a_state_folder_nothing_is_journalled_or_synced(tiny_h5: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs of a server without a state folder end with it, so it journals, logs and syncs nothing; the assembly,
    status and events are the same (a forced subject included)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("journalled or synced by a server without a state folder")

    monkeypatch.setattr(persistence_module.os, "fsync", forbidden)
    monkeypatch.setattr(job_module, "fsync_path", forbidden)
    monkeypatch.setattr(job_module, "write_atomic", forbidden)
    monkeypatch.setattr(persistence_module, "write_atomic", forbidden)
    monkeypatch.setattr(Journal, "append", forbidden)
    with server_in_thread({"tiny": tiny_h5}) as server, pw.connect(server.address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing())
        with client.assembler(ds, overlap="average", job_id=JOB, entries={ENTRY: CHANNELS}) as assembler:
            for batch in FIRST:  # subject 0 whole, 1 half, 2 a quarter
                assembler.add_batch(_batch(batch), batch)
            assembler.add_batch(_batch(list(range(30, 40))), list(range(30, 40)), last_batch=True)
            status = client.job_status(JOB, max_missing=100)
            assert [(s.state, s.forced, s.received, s.missing_sample_indices[:1]) for s in status.subjects] == [
                ("ready", False, 20, ()),
                ("ready", False, 20, ()),
                ("ready", True, 5, (45,)),
            ]
            assert [(e.type, e.subject_index) for e in _events(assembler, 4)] == [
                ("subject_ready", 0),
                ("subject_ready", 1),
                ("subject_ready", 2),
                ("job_completed", -1),
            ]
            for subject in (0, 1):
                np.testing.assert_array_equal(assembler.get_assembled_subject(subject)[ENTRY], _expected(subject))
            forced = assembler.get_assembled_subject(2)[ENTRY]
            np.testing.assert_array_equal(forced[:5], _expected(2)[:5])
            assert not forced[5:].any()  # never predicted: no weight, a zero mean
            assert server.assembly is not None
            files = {path.name for path in server.assembly.state_dir.rglob("*") if path.is_file()}
            assert not {name for name in files if name.endswith(".journal")}
            assert not files & {"job.json", "events.jsonl"}


# -- memory bound ---------------------------------------------------------------------------------------------------

MEM_SUBJECTS = 10
MEM_SHAPE = (24, 32, 32)


def _geometry(shape: tuple[int, int, int]) -> ImageProperties:
    return ImageProperties(
        size=shape[::-1], origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), direction=np.eye(3).ravel()
    )


def _write_dataset(path: Path, subjects: int, shape: tuple[int, int, int]) -> Path:
    records = [
        SubjectRecord(f"S{k:02d}", {"images": {"T1": np.zeros(shape, np.uint8)}}, _geometry(shape))
        for k in range(subjects)
    ]
    write_pymia_dataset(path, records)
    return path


@pytest.fixture(scope="module")
def many_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 subjects of 24x32x32 (an all-zero uint8 image: only the geometry matters for assembly)."""
    return _write_dataset(tmp_path_factory.mktemp("many") / "many.h5", MEM_SUBJECTS, MEM_SHAPE)


def _buffer_bytes(shape: tuple[int, ...], channels: int) -> int:
    """One subject's partial volume in average mode: a float32 sum per channel and a float32 weight per voxel."""
    return int(np.prod(shape)) * (4 * channels + 4)


class _Oracle:
    """Predictions (small integers as float32, so sums are exact in any order) and the averages they make."""

    def __init__(self, ds: pw.RemoteDatasource, shape: tuple[int, int, int], channels: int) -> None:
        self.channels = channels
        samples = ds.get_samples(list(range(len(ds))))
        self.exprs = [s[defs.KEY_INDEX_EXPR].expression for s in samples]
        self.subject_of = [int(s[defs.KEY_SUBJECT_INDEX]) for s in samples]
        rng = np.random.default_rng(5)
        self.predictions = []
        sums = {s: np.zeros((*shape, channels), np.float32) for s in set(self.subject_of)}
        weights = {s: np.zeros(shape, np.float32) for s in set(self.subject_of)}
        for i, expr in enumerate(self.exprs):
            region = np.empty(shape, np.uint8)[expr].shape
            pred = rng.integers(-40, 40, size=(*region, channels)).astype(np.float32)
            self.predictions.append(pred)
            sums[self.subject_of[i]][expr] += pred
            weights[self.subject_of[i]][expr] += 1
        self.expected = {s: (sums[s] / weights[s][..., None]).astype(np.float32) for s in sums}

    def interleaved(self, batch_size: int, seed: int) -> list[list[int]]:
        """Every sample once, shuffled across subjects so that every subject starts before any finishes."""
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(self.exprs))]
        first = {s: min(k for k, i in enumerate(order) if self.subject_of[i] == s) for s in self.expected}
        last = {s: max(k for k, i in enumerate(order) if self.subject_of[i] == s) for s in self.expected}
        assert max(first.values()) < min(last.values())
        return _chunks(order, batch_size)


def _post_all(
    server: PatchwireServer, oracle: _Oracle, ds: pw.RemoteDatasource, client: pw.Client, budget: int, batches: Any
) -> int:
    """Posts every batch, checking the resident bytes after each; returns the largest resident size seen."""
    assert server.assembly is not None
    pool = server.assembly.pool
    most = 0
    with client.assembler(ds, overlap="average", entries={"p": oracle.channels}) as assembler:
        for batch in batches:
            assembler.add_samples({"p": [oracle.predictions[i] for i in batch]}, batch)
            status = client.job_status(str(assembler.job_id), max_missing=0)
            assert status.resident_buffer_bytes <= budget
            assert pool.resident <= budget
            most = max(most, status.resident_buffer_bytes)
        status = client.job_status(str(assembler.job_id), max_missing=0)
        assert (status.state, status.ready_subject_count) == ("completed", len(oracle.expected))
        for s, expected in oracle.expected.items():  # (a fetch waits until the subject's volume is written)
            np.testing.assert_array_equal(assembler.get_assembled_subject(s)["p"], expected)
        status = client.job_status(str(assembler.job_id), max_missing=0)
        assert status.resident_buffer_bytes == 0 and pool.resident == 0  # written volumes are unmapped
    return most


@pytest.mark.parametrize("state_folder", [True, False], ids=["state-dir", "no-state-dir"])
def test_resident_partial_volumes_stay_within_the_budget(many_h5: Path, tmp_path: Path, state_folder: bool) -> None:
    subject_bytes = _buffer_bytes(MEM_SHAPE, 1)
    budget = int(2.5 * subject_bytes)  # room for two subjects' partial volumes of ten in flight
    state = tmp_path / "state" if state_folder else None
    with (
        server_in_thread({"many": many_h5}, state_dir=state, assembly_memory_bytes=budget) as server,
        pw.connect(server.address) as client,
    ):
        # slices along all three axes: every voxel is covered three times, so the averages need the sums and
        # weights that were paged out and back in
        ds = client.datasource(
            "many",
            extr.SliceIndexing(slice_axis=(0, 1, 2)),
            extr.ComposeExtractor([extr.IndexingExtractor(), extr.SubjectExtractor()]),
        )
        oracle = _Oracle(ds, MEM_SHAPE, channels=1)
        assert len(ds) == MEM_SUBJECTS * sum(MEM_SHAPE)
        most = _post_all(server, oracle, ds, client, budget, oracle.interleaved(batch_size=8, seed=1))
        assert most == 2 * subject_bytes  # the budget was used, and never more


@pytest.mark.parametrize("state_folder", [True, False], ids=["state-dir", "no-state-dir"])
def test_memory_of_finished_buffers_is_reused_zeroed(tiny_h5: Path, tmp_path: Path, state_folder: bool) -> None:
    """A finished subject's buffer memory is kept (within the budget) for the next subject's buffers, and comes back
    zeroed: a later job's forced subject shows zeros wherever nothing arrived, not the earlier job's values."""
    state = tmp_path / "state" if state_folder else None
    with server_in_thread({"tiny": tiny_h5}, state_dir=state) as server, pw.connect(server.address) as client:
        assert server.assembly is not None
        pool = server.assembly.pool
        ds = client.datasource("tiny", extr.SliceIndexing())
        subject = list(range(SUBJECT_SAMPLES))
        with client.assembler(ds, job_id="first", entries={ENTRY: CHANNELS}) as assembler:
            assembler.add_batch(_batch(subject, offset=5.0), subject)
            np.testing.assert_array_equal(
                assembler.get_assembled_subject(0)[ENTRY], np.stack(_batch(subject, 5.0)[ENTRY])
            )
            assembler.delete()
        spare = pool.spare_bytes
        assert spare >= SUBJECT_SAMPLES * int(np.prod(SLICE_SHAPE)) * CHANNELS * 4  # subject 0's buffer, kept
        half = subject[: SUBJECT_SAMPLES // 2]
        with client.assembler(ds, job_id="second", entries={ENTRY: CHANNELS}) as assembler:
            assembler.add_batch(_batch(half), half)
            assert pool.spare_bytes < spare  # the new buffer took the kept memory
            assembler.add_batch(_batch([SUBJECT_SAMPLES]), [SUBJECT_SAMPLES], last_batch=True)
            volume = assembler.get_assembled_subject(0)[ENTRY]
            np.testing.assert_array_equal(volume[: len(half)], _expected(0)[: len(half)])
            assert not volume[len(half) :].any()


def test_reused_memory_is_zeroed_where_the_samples_leave_gaps(tiny_h5: Path) -> None:
    """Buffers whose samples cover every voxel (slices) skip zeroing reused memory, as every byte is written before
    the volume is read; buffers of samples with gaps (8^3 patches without the incomplete ones on a 20x24x16
    subject) get it zeroed: the gaps show zeros, not an earlier job's values."""
    with server_in_thread({"tiny": tiny_h5}) as server, pw.connect(server.address) as client:
        assert server.assembly is not None
        pool = server.assembly.pool
        slices = client.datasource("tiny", extr.SliceIndexing())
        subject = list(range(SUBJECT_SAMPLES))
        with client.assembler(slices, entries={ENTRY: CHANNELS}) as assembler:
            assembler.add_batch(_batch(subject, offset=5.0), subject)
            assembler.delete()
        spare = pool.spare_bytes
        patches = client.datasource("tiny", extr.PatchWiseIndexing((8, 8, 8), ignore_incomplete=True))
        count = len(patches) // 3  # 2 x 3 x 2 patches per subject
        with client.assembler(patches, entries={ENTRY: CHANNELS}) as assembler:
            assembler.add_batch({ENTRY: np.ones((count, 8, 8, 8, CHANNELS), np.float32)}, list(range(count)))
            assert pool.spare_bytes < spare  # the memory of the slice job's buffer
            volume = assembler.get_assembled_subject(0)[ENTRY]
        assert (volume[:16] == 1).all() and not volume[16:].any()


def test_a_subject_larger_than_the_budget_is_mapped_alone(many_h5: Path, tmp_path: Path) -> None:
    subject_bytes = _buffer_bytes(MEM_SHAPE, 3)
    budget = subject_bytes // 4
    with (
        server_in_thread({"many": many_h5}, state_dir=tmp_path / "state", assembly_memory_bytes=budget) as server,
        pw.connect(server.address) as client,
    ):
        ds = client.datasource(
            "many",
            extr.SliceIndexing(slice_axis=(0, 2)),
            extr.ComposeExtractor([extr.IndexingExtractor(), extr.SubjectExtractor()]),
            subject_subset=["S03", "S07"],
        )
        oracle = _Oracle(ds, MEM_SHAPE, channels=3)
        most = _post_all(server, oracle, ds, client, subject_bytes, oracle.interleaved(batch_size=5, seed=2))
        assert most == subject_bytes


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the peak resident size) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc (Linux)")
def test_server_resident_memory_stays_near_the_budget(tmp_path: Path) -> None:
    """A ``patchwire serve`` process with --assembly-memory 64 assembles 12 subjects whose partial volumes total
    288 MiB, all in flight at once; its peak resident size grows by less than the budget plus a fixed allowance for
    one subject's result being computed, gRPC buffers and the allocator (measured: about 80 MiB of growth; without
    the bound it is over 300 MiB)."""
    shape, subjects, budget_mib, allowance_mib = (128, 128, 128), 12, 64, 96
    total_mib = subjects * _buffer_bytes(shape, 2) / 2**20
    assert total_mib > 4 * budget_mib and total_mib > budget_mib + allowance_mib
    h5 = _write_dataset(tmp_path / "big.h5", subjects, shape)
    args = ("--state-dir", str(tmp_path / "state"), "--assembly-memory", str(budget_mib))
    with serve_process({"big": h5}, args) as (proc, address), pw.connect(address) as client:
        ds = client.datasource("big", extr.SliceIndexing())
        baseline = _memory_mib(proc.pid)["VmRSS"]
        prediction = np.ones((8, *shape[1:], 2), np.float32)
        with client.assembler(ds, overlap="average", entries={"p": 2}) as assembler:
            for start in range(0, shape[0], 8):  # round robin: every subject is in flight until the last round
                for s in range(subjects):
                    first = s * shape[0] + start
                    assembler.add_batch({"p": prediction}, list(range(first, first + 8)))
            status = client.job_status(str(assembler.job_id), max_missing=0)
            growth = _memory_mib(proc.pid)["VmHWM"] - baseline
            assert (status.state, status.ready_subject_count) == ("completed", subjects)
            assert growth < budget_mib + allowance_mib
            np.testing.assert_array_equal(assembler.get_assembled_subject(subjects - 1)["p"], 1.0)


def test_journal_records_survive_short_writes_and_many_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record is written from the arrays' own memory with writev: more buffers than one call takes, and calls
    that write only part of what they were given, still leave every record intact and in order."""
    real_writev = journal_module.os.writev
    calls: list[int] = []

    def counting_writev(fd: int, buffers: Sequence[Any]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, buffers)

    def short_writev(fd: int, buffers: Sequence[Any]) -> int:
        first = memoryview(buffers[0]).cast("B")
        return real_writev(fd, [first[: max(1, len(first) // 3)]])  # a third of the first buffer only

    journal = Journal(tmp_path / "j.journal")
    many = {
        "p": [np.full((2, 3), i, np.float32) for i in range(1500)],
        "q": [np.arange(i % 5, dtype=np.int16) for i in range(1500)],
    }
    monkeypatch.setattr(journal_module.os, "writev", counting_writev)
    journal.append(list(range(1500)), many)
    assert len(calls) == 3 and max(calls) == 1024  # 3002 buffers
    monkeypatch.setattr(journal_module.os, "writev", short_writev)
    journal.append([7, 9], {"p": [np.ones((4, 4), np.float64), np.zeros((1,), np.uint8)], "q": [np.eye(2), np.eye(3)]})
    monkeypatch.undo()
    first, second = journal.records()
    assert first.sample_indices == list(range(1500))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(first.arrays["p"], many["p"], strict=True))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(first.arrays["q"], many["q"], strict=True))
    assert second.sample_indices == [7, 9]
    assert second.arrays["p"][0].dtype == np.float64 and np.array_equal(second.arrays["q"][1], np.eye(3))
