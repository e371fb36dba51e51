"""The server's Prometheus metrics after real calls on a real server, scraped from its HTTP endpoint and parsed with
prometheus-client's own parser: samples and bytes served as requested, status codes, refusals under their limit,
open streams, the block cache and assembly jobs; and one endpoint summing several processes' files in a run_dir.

Metrics belong to the process (several servers of one test process add to the same counters), so counters are
compared before and after a server's calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from _metrics_scrape import grown, scrape, value

import patchwire.client as pw
from patchwire.client import extraction as extr
from patchwire.service import _metrics
from patchwire.service._limits import Limits
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, spec_pb2, tensor_pb2
from patchwire.wire import framing

from _checks import eventually, expect_raw
from _servers import ThreadedServer, slices_spec, threaded_server

RPC_TIMEOUT_S = 30
SLICE_BYTES = 24 * 16 * 2 * 4  # one axial slice of tiny's two float32 images
CACHE_BYTES = 8 << 20


@pytest.fixture
def served(tiny_h5: Path) -> Iterator[ThreadedServer]:
    with threaded_server(
        {"tiny": tiny_h5}, metrics_port=0, cache_bytes=CACHE_BYTES, limits=Limits(max_indices=32)
    ) as handle:
        assert handle.server.metrics is not None and handle.server.metrics.port is not None
        yield handle


@pytest.fixture
def datasets(served: ThreadedServer) -> Iterator[dataset_service_pb2_grpc.DatasetServiceStub]:
    with grpc.insecure_channel(served.server.address, options=framing.channel_options()) as channel:
        yield dataset_service_pb2_grpc.DatasetServiceStub(channel)


def port_of(served: ThreadedServer) -> int:
    assert served.server.metrics is not None and served.server.metrics.port is not None
    return served.server.metrics.port


def test_samples_and_bytes_served_are_what_was_requested(
    served: ThreadedServer, datasets: dataset_service_pb2_grpc.DatasetServiceStub
) -> None:
    port = port_of(served)
    before = scrape(port)
    streamed = list(
        datasets.StreamBatches(
            dataset_service_pb2.StreamBatchesRequest(spec=slices_spec(), batch_size=4), timeout=RPC_TIMEOUT_S
        )
    )
    got = list(
        datasets.GetSamples(
            dataset_service_pb2.GetSamplesRequest(spec=slices_spec(), sample_indices=[0, 5, 59]), timeout=RPC_TIMEOUT_S
        )
    )
    after = scrape(port)
    labels = {"dataset": "tiny", "identity": "anonymous", "pattern": "slice"}
    assert grown(before, after, "patchwire_served_samples_total", **labels) == 60 + 3
    # payload bytes of the arrays, plus the batches' own messages; at most what crossed the wire
    served_bytes = grown(before, after, "patchwire_served_bytes_total", **labels)
    wire_bytes = sum(m.ByteSize() for m in [*streamed, *got])
    assert 63 * SLICE_BYTES < served_bytes <= wire_bytes
    for method in ("StreamBatches", "GetSamples"):
        assert grown(before, after, "patchwire_rpc_handled_total", method=method, code="OK") == 1
        assert grown(before, after, "patchwire_rpc_duration_seconds_count", method=method) == 1
        assert grown(before, after, "patchwire_stream_work_seconds_total", method=method) > 0
        assert grown(before, after, "patchwire_open_streams", method=method) == 0
    # the block cache: its reads, and what it holds of its capacity
    reads = grown(before, after, "patchwire_cache_hits_total") + grown(before, after, "patchwire_cache_misses_total")
    assert reads > 0
    assert value(after, "patchwire_cache_capacity_bytes") >= CACHE_BYTES  # (with other servers of this process)
    assert value(after, "patchwire_cache_bytes") > 0


def test_samples_kept_compressed_are_counted(
    served: ThreadedServer, datasets: dataset_service_pb2_grpc.DatasetServiceStub
) -> None:
    """Whole volumes (61 KB, kept compressed) streamed twice with shuffle-lz4: built once, sent again from memory."""
    spec = spec_pb2.DatasourceSpec(dataset="tiny", extractor=slices_spec().extractor)
    spec.indexing_strategy.empty.SetInParent()
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=spec, batch_size=3, compression=tensor_pb2.Compression.COMPRESSION_SHUFFLE_LZ4
    )
    port = port_of(served)
    before = scrape(port)
    for _ in range(2):
        list(datasets.StreamBatches(request, timeout=RPC_TIMEOUT_S))
    after = scrape(port)
    assert grown(before, after, "patchwire_packed_cache_misses_total") == 3
    assert grown(before, after, "patchwire_packed_cache_hits_total") == 3
    assert grown(before, after, "patchwire_packed_cache_bytes") > 0
    assert value(after, "patchwire_packed_cache_capacity_bytes") >= served.server.config.packed_cache_bytes


def test_status_codes_and_refusals_are_counted_under_their_limit(
    served: ThreadedServer, datasets: dataset_service_pb2_grpc.DatasetServiceStub
) -> None:
    port = port_of(served)
    before = scrape(port)
    with expect_raw(grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-indices"):
        list(
            datasets.GetSamples(
                dataset_service_pb2.GetSamplesRequest(spec=slices_spec(), sample_indices=range(33)),
                timeout=RPC_TIMEOUT_S,
            )
        )
    unknown = spec_pb2.DatasourceSpec(dataset="nope")
    with expect_raw(grpc.StatusCode.NOT_FOUND, "unknown dataset"):
        datasets.OpenDatasource(dataset_service_pb2.OpenDatasourceRequest(spec=unknown), timeout=RPC_TIMEOUT_S)
    datasets.ListDatasets(dataset_service_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT_S)
    after = scrape(port)
    assert grown(before, after, "patchwire_refused_requests_total", limit="max-indices") == 1
    assert grown(before, after, "patchwire_rpc_handled_total", method="GetSamples", code="RESOURCE_EXHAUSTED") == 1
    assert grown(before, after, "patchwire_rpc_handled_total", method="OpenDatasource", code="NOT_FOUND") == 1
    assert grown(before, after, "patchwire_rpc_handled_total", method="ListDatasets", code="OK") == 1
    labels = {"dataset": "tiny", "identity": "anonymous", "pattern": "slice"}
    assert grown(before, after, "patchwire_served_samples_total", **labels) == 0


def test_open_streams_follow_a_stream_until_it_ends(
    served: ThreadedServer, datasets: dataset_service_pb2_grpc.DatasetServiceStub
) -> None:
    port = port_of(served)
    # a long epoch of weighted draws: the stream stays open while this test reads its first message
    request = dataset_service_pb2.StreamBatchesRequest(
        spec=slices_spec(), batch_size=4, sample_weights=[1.0] * 60, samples_per_epoch=1 << 20
    )
    before = scrape(port)
    call = datasets.StreamBatches(request, timeout=RPC_TIMEOUT_S)
    next(call)
    assert grown(before, scrape(port), "patchwire_open_streams", method="StreamBatches") == 1
    call.cancel()
    eventually(lambda: grown(before, scrape(port), "patchwire_open_streams", method="StreamBatches"), lambda v: v == 0)
    handled = scrape(port)
    assert grown(before, handled, "patchwire_rpc_handled_total", method="StreamBatches", code="CANCELLED") == 1


def test_assembly_jobs_subjects_and_posted_bytes(served: ThreadedServer) -> None:
    port = port_of(served)
    before = scrape(port)
    with pw.connect(served.server.address) as client:
        ds = client.datasource("tiny", extr.SliceIndexing(), extr.DataExtractor(("images",)), shared_memory=False)
        assembler = client.assembler(ds, shared_memory=False)
        try:
            predictions = np.ones((20, 24, 16, 1), np.float32)  # every slice of subject 0
            assembler.add_batch(predictions, np.arange(20))
            assembler.flush()
            after = scrape(port)
            assert grown(before, after, "patchwire_assembly_jobs", state="active") == 1
            assert grown(before, after, "patchwire_assembly_subjects", state="ready") == 1
            assert grown(before, after, "patchwire_assembly_subjects", state="pending") == 2
            assert grown(before, after, "patchwire_posted_samples_total", identity="anonymous") == 20
            assert grown(before, after, "patchwire_posted_bytes_total", identity="anonymous") == predictions.nbytes
        finally:
            assembler.delete()
    gone = scrape(port)
    assert grown(before, gone, "patchwire_assembly_jobs", state="active") == 0
    assert grown(before, gone, "patchwire_assembly_subjects", state="ready") == 0


def test_a_stopped_server_withdraws_its_gauges_and_endpoint(tiny_h5: Path) -> None:
    registry = _metrics.metrics().registry
    assert registry is not None

    def capacity() -> float:  # (every server of this process adds its cache's)
        return registry.get_sample_value("patchwire_cache_capacity_bytes") or 0.0

    others = capacity()
    with threaded_server({"tiny": tiny_h5}, metrics_port=0, cache_bytes=CACHE_BYTES) as handle:
        port = port_of(handle)
        assert value(scrape(port), "patchwire_cache_capacity_bytes") == others + CACHE_BYTES
        handle.submit(handle.server.stop(0.5)).result(timeout=RPC_TIMEOUT_S)
        assert handle.server.metrics is None
        with pytest.raises(OSError):
            scrape(port)
    assert capacity() == others


def test_without_a_port_there_is_no_endpoint(tiny_h5: Path) -> None:
    with threaded_server({"tiny": tiny_h5}) as handle:
        assert handle.server.metrics is not None and handle.server.metrics.port is None


# -- several processes ------------------------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from patchwire.service import _metrics

    run_dir, index, samples = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _metrics.init_process(run_dir, index)
    m = _metrics.metrics()
    m.served_samples.labels("tiny", "anonymous", "slice").inc(samples)
    m.open_streams.labels("StreamBatches").inc()
    m.rpc_duration.labels("StreamBatches").observe(0.2)
    m.refused.labels("max-calls").inc()
    print(__import__("os").getpid())
    """
)


def test_one_endpoint_sums_the_processes_of_a_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pids = [
        int(
            subprocess.run(
                [sys.executable, "-c", _WORKER, str(run_dir), str(index), str(samples)],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
        for index, samples in ((0, 3), (1, 4))
    ]
    port = _metrics.start_http("127.0.0.1", 0, run_dir)
    try:
        summed = scrape(port)
        labels = {"dataset": "tiny", "identity": "anonymous", "pattern": "slice"}
        assert value(summed, "patchwire_served_samples_total", **labels) == 7
        assert value(summed, "patchwire_open_streams", method="StreamBatches") == 2
        assert value(summed, "patchwire_rpc_duration_seconds_count", method="StreamBatches") == 2
        assert value(summed, "patchwire_rpc_duration_seconds_bucket", method="StreamBatches", le="0.25") == 2
        assert value(summed, "patchwire_refused_requests_total", limit="max-calls") == 2
        # a process that ended: its live gauges leave the sums, its counters stay
        _metrics.process_exited(pids[0], run_dir)
        after = scrape(port)
        assert value(after, "patchwire_open_streams", method="StreamBatches") == 1
        assert value(after, "patchwire_served_samples_total", **labels) == 7
    finally:
        _metrics.stop_http(port)
    files = {p.name for p in (run_dir / "metrics").iterdir()}
    assert {f"counter_{pids[0]}.db", f"counter_{pids[1]}.db", f"gauge_livesum_{pids[1]}.db"} <= files
    assert f"gauge_livesum_{pids[0]}.db" not in files


def test_pattern_labels_follow_the_indexing_strategy() -> None:
    spec = spec_pb2.DatasourceSpec(dataset="tiny")
    assert _metrics.pattern_of(spec) == "subject"
    for field, pattern in (
        ("slice", "slice"),
        ("patch_wise", "patch"),
        ("voxel_wise", "voxel"),
        ("patch_sampling", "random_patch"),
        ("empty", "subject"),
    ):
        spec = spec_pb2.DatasourceSpec(dataset="tiny")
        getattr(spec.indexing_strategy, field).SetInParent()
        assert _metrics.pattern_of(spec) == pattern
        assert pattern in _metrics.PATTERNS
