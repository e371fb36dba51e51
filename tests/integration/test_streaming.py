"""The wire: big samples travel in chunks of at most CHUNK_BYTES (2 MiB), small samples are grouped into messages of
whole batches, and the decoded values equal the file's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest

import patchwire.client as pw
from patchwire.client import _page_pool
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.service._dataset_service import MAX_SAMPLES_PER_MESSAGE
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc, spec_pb2
from patchwire.wire import framing

from _datasets import write_arrays_dataset
from _servers import server_in_thread

SHAPE = (40, 96, 80)  # one subject's images: 40*96*80*2*4 bytes = 2.4 MiB
N_PATCHES = 20 * 12 * 10  # patches of 2 x 8 x 8 per subject


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    rng = np.random.default_rng(11)
    subjects = [
        {
            "images": {k: rng.normal(size=SHAPE).astype(np.float32) for k in ("T1", "T2")},
            "labels": {"GT": rng.integers(0, 6, SHAPE, dtype=np.uint8)},
        }
        for _ in range(2)
    ]
    path = write_arrays_dataset(tmp_path_factory.mktemp("big") / "big.h5", subjects)
    with server_in_thread({"big": path}) as server:
        yield server.address, path


def _raw_stream(address: str, spec: spec_pb2.DatasourceSpec, batch_size: int) -> list:
    with grpc.insecure_channel(address, options=framing.channel_options()) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        return list(stub.StreamBatches(dataset_service_pb2.StreamBatchesRequest(spec=spec, batch_size=batch_size)))


def test_whole_volumes_are_chunked(big: tuple[str, Path]) -> None:
    address, path = big
    spec = spec_pb2.DatasourceSpec(dataset="big", extractor=extr.DataExtractor()._to_proto())
    responses = _raw_stream(address, spec, 1)
    assert max(r.ByteSize() for r in responses) <= framing.CHUNK_BYTES + 64
    kinds = [r.WhichOneof("payload") for r in responses]
    nbytes = int(np.prod(SHAPE)) * 2 * 4
    chunks_per_volume = -(-nbytes // framing.CHUNK_BYTES)
    assert kinds == (["batch"] + ["chunk"] * chunks_per_volume) * 2
    ds = pw.connect(address).datasource("big", extr.EmptyIndexing(), extr.DataExtractor())
    with h5py.File(path, "r") as f:
        for i in range(2):
            sample = ds[i]
            assert sample[defs.KEY_IMAGES].shape == (*SHAPE, 2)
            assert np.array_equal(sample[defs.KEY_IMAGES], f[f"data/images/{i}"][()])
        whole = ds.direct_extract(extr.DataExtractor(categories=("images", "labels")), 1)
        assert np.array_equal(whole["labels"], f["data/labels/1"][()])


def test_small_samples_are_grouped_into_messages_of_whole_batches(big: tuple[str, Path]) -> None:
    address, path = big
    spec = spec_pb2.DatasourceSpec(
        dataset="big",
        indexing_strategy=extr.PatchWiseIndexing((2, 8, 8))._to_proto(),
        extractor=extr.DataExtractor(categories=("images", "labels"))._to_proto(),
        subject_subset=spec_pb2.StringList(values=["S1"]),
    )
    responses = _raw_stream(address, spec, 16)
    batches = [r.batch for r in responses if r.WhichOneof("payload") == "batch"]
    counts = [len(b.sample_indices) for b in batches]
    assert counts[0] == 16  # the first message holds one batch: a short time to first batch
    assert all(c % 16 == 0 for c in counts[:-1]) and max(counts) >= 512
    # a batch message plus the chunks of its (stacked) tensors: whole batches up to TARGET_MESSAGE_BYTES, at most
    # MAX_SAMPLES_PER_MESSAGE samples
    sizes, current = [], 0
    for r in responses:
        if r.WhichOneof("payload") == "batch" and current:
            sizes.append(current)
            current = 0
        current += r.ByteSize()
    sizes.append(current)
    per_sample = sizes[0] / counts[0]
    by_bytes = int(framing.TARGET_MESSAGE_BYTES // (per_sample * 16)) * 16
    per_message = min(by_bytes, MAX_SAMPLES_PER_MESSAGE // 16 * 16)
    assert counts[1:-1] == [per_message] * (len(counts) - 2)
    assert 0 < counts[-1] <= per_message and sum(counts) == N_PATCHES
    assert all(size <= 1.05 * framing.TARGET_MESSAGE_BYTES for size in sizes)
    assert max(r.ByteSize() for r in responses) <= framing.CHUNK_BYTES + 64
    ds = pw.connect(address).datasource(
        "big", extr.PatchWiseIndexing((2, 8, 8)), extr.DataExtractor(), subject_subset=["S1"]
    )
    with h5py.File(path, "r") as f:
        full = f["data/images/1"][()]
    # patch k of S1 (whose samples follow S0's) is grid cell k of a 20 x 12 x 10 grid, C order
    cells = full.reshape(20, 2, 12, 8, 10, 8, 2).transpose(0, 2, 4, 1, 3, 5, 6).reshape(N_PATCHES, 2, 8, 8, 2)
    seen = 0
    for batch in ds.batches(batch_size=16):
        assert batch[defs.KEY_IMAGES].shape[1:] == (2, 8, 8, 2) and len(batch[defs.KEY_IMAGES]) <= 16
        idx = batch[defs.KEY_SAMPLE_INDEX] - N_PATCHES
        assert np.array_equal(batch[defs.KEY_IMAGES], cells[idx])
        seen += len(idx)
    assert seen == N_PATCHES


def test_recycled_buffers_never_change_a_batch_that_is_still_held(big: tuple[str, Path]) -> None:
    """Payload buffers are reused once their arrays are gone (no fresh pages per batch); a batch the caller keeps,
    here as a torch tensor viewing the buffer, keeps its values while later batches arrive."""
    torch = pytest.importorskip("torch")
    address, path = big
    with pw.connect(address) as client:
        ds = client.datasource("big", extr.EmptyIndexing(), extr.DataExtractor(categories=(defs.KEY_IMAGES,)))
        kept = []
        for epoch in range(4):
            for i, batch in enumerate(ds.batches(batch_size=1, shuffle=True, seed=3, epoch=epoch)):
                images = torch.from_numpy(batch[defs.KEY_IMAGES])
                if i == 0:
                    kept.append((int(batch[defs.KEY_SAMPLE_INDEX][0]), images, images.clone()))
                del batch, images
        assert _page_pool.process_pool().recycled > 0  # (the pool every connection of this process uses)
    with h5py.File(path, "r") as f:
        for subject, held, at_arrival in kept:
            assert torch.equal(held, at_arrival)
            np.testing.assert_array_equal(held.numpy()[0], f[f"data/images/{subject}"][()])
