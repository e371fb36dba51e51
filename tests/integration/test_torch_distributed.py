"""PyTorchStreamingDataset for DDP, resume and subjects of different shapes, against a real server (a child
process: DataLoader workers fork this process) with real torch: two gloo ranks on the loopback interface, each with
two DataLoader workers, cover every epoch once in lockstep; the rank's batches and the augmented samples do not
depend on the numbers of workers or ranks; set_epoch reaches persistent workers (forked and spawned); torchdata's
StatefulDataLoader resumes mid-epoch at the cursor, and a checkpoint of two workers or two ranks resumes with one;
batches of samples of different shapes are refused with a clear message, padded, listed or grouped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as torch_data
from _torch_ranks import BATCH, SEED, Batches, datasource, record, run_ranks

import patchwire.client as pw
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client._epochs import EpochOptions
from patchwire.client.torch import PADDED_SHAPES, PytorchDatasetAdapter, PytorchStreamingDataset

from _servers import server_subprocess

pytest.importorskip("torchdata")
from torchdata.stateful_dataloader import StatefulDataLoader

pytestmark = [
    # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates (harmless; it only records a flag)
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning"),
    # three workers on a 2-core machine, on purpose: the batches must not depend on their number
    pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes:UserWarning"),
]

SAMPLES = 60  # the "tiny" dataset's axial slices
WAIT_S = 240  # for the ranks to finish: a bound, never a pace


@pytest.fixture(scope="module")
def address(tiny_h5: Path, vary_h5: Path) -> Iterator[str]:
    with server_subprocess({"tiny": tiny_h5, "vary": vary_h5}) as address:
        yield address


@pytest.fixture(scope="module")
def ranks(address: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What two gloo ranks saw (see ``_torch_ranks.scenarios``)."""
    return run_ranks(2, address, tmp_path_factory.mktemp("ranks"), WAIT_S)


def _stream(ds: pw.RemoteDatasource, **kwargs: Any) -> PytorchStreamingDataset:
    return PytorchStreamingDataset(ds, **{"batch_size": BATCH, "shuffle": True, "seed": SEED, **kwargs})


def _epoch(stream: PytorchStreamingDataset, epoch: int, workers: int = 0) -> Batches:
    stream.set_epoch(epoch)
    return record(torch_data.DataLoader(stream, batch_size=None, num_workers=workers))


def _indices(batches: Batches) -> list[int]:
    return [i for indices, _ in batches for i in indices]


def _digests(batches: Batches) -> list[str]:
    return [d for _, ds in batches for d in ds]


# -- ranks ----------------------------------------------------------------------------------------------------------


def test_ranks_take_their_shard_from_the_process_group(ranks: list[dict[str, Any]]) -> None:
    assert [r["shard"] for r in ranks] == [(0, 2), (1, 2)]
    assert [r["len"] for r in ranks] == [(8, 8), (8, 8)]  # 30 samples each in batches of 4, whatever the workers
    assert [r["explicit"] for r in ranks] == [(0, 1, 15)] * 2  # explicit arguments override the group


def test_two_ranks_with_two_workers_stream_each_epoch_once_in_the_global_order(
    ranks: list[dict[str, Any]], address: str
) -> None:
    for epoch in (0, 1):
        per_rank = [r[f"epoch{epoch}"] for r in ranks]
        assert [len(batches) for batches in per_rank] == [8, 8]
        assert sorted(_indices(per_rank[0]) + _indices(per_rank[1])) == list(range(SAMPLES))
        # rank r takes positions r, r + 2, ... of the one global order (a single consumer's whole epoch)
        order = _indices(_epoch(_stream(datasource(address)), epoch))
        assert [_indices(per_rank[0]), _indices(per_rank[1])] == [order[0::2], order[1::2]]
    assert _indices(ranks[0]["epoch0"]) != _indices(ranks[0]["epoch1"])  # set_epoch reached persistent workers


def test_the_augmented_epoch_is_the_same_byte_for_byte_with_any_workers_and_ranks(
    ranks: list[dict[str, Any]], address: str
) -> None:
    by_index: dict[int, str] = {}
    for r in ranks:
        by_index.update(zip(_indices(r["epoch0"]), _digests(r["epoch0"]), strict=True))
    one_worker = _epoch(_stream(datasource(address)), 0, workers=1)
    three_workers = _epoch(_stream(datasource(address)), 0, workers=3)
    assert one_worker == three_workers  # the same batches, contents and order
    assert dict(zip(_indices(one_worker), _digests(one_worker), strict=True)) == by_index
    epoch1 = {i: d for r in ranks for i, d in zip(_indices(r["epoch1"]), _digests(r["epoch1"]), strict=True)}
    assert sum(epoch1[i] != by_index[i] for i in range(SAMPLES)) > SAMPLES // 2  # another epoch, other draws


def test_odd_epochs_are_balanced_by_padding_or_dropping(ranks: list[dict[str, Any]], address: str) -> None:
    subset = EpochOptions(sample_subset=list(range(59)))
    order = _indices(_epoch(_stream(datasource(address), epoch_options=subset), 0))
    padded = [r["pad"] for r in ranks]
    assert [len(batches) for batches in padded] == [8, 8]  # 30 samples each: the first one repeated on rank 1
    counts = Counter(_indices(padded[0]) + _indices(padded[1]))
    assert sorted(counts) == list(range(59)) and [i for i, n in counts.items() if n == 2] == [order[0]]
    assert _indices(padded[1])[-1] == order[0]
    dropped = [r["drop"] for r in ranks]
    assert [len(batches) for batches in dropped] == [8, 8]  # 29 samples each
    kept = _indices(dropped[0]) + _indices(dropped[1])
    assert len(kept) == 58 and set(range(59)) - set(kept) == {order[-1]}


def test_a_checkpoint_of_two_ranks_resumes_on_one_rank(ranks: list[dict[str, Any]], address: str) -> None:
    full = _epoch(_stream(datasource(address)), 2)
    consumed = [r["checkpoint"][0] for r in ranks]
    assert [_indices(c) for c in consumed] == [_indices(full)[0:24:2], _indices(full)[1:24:2]]
    for r in ranks:  # the ranks' loader states are alike: either one resumes the epoch
        ds = datasource(address)
        stream = _stream(ds)  # epoch 0 here: the state says it was epoch 2
        stream.load_state_dict(r["checkpoint"][1])
        rest = record(StatefulDataLoader(stream, batch_size=None, num_workers=1))
        assert _indices(rest) == _indices(full)[24:] and _digests(rest) == _digests(full)[24:]
        assert ds.stats.snapshot().samples == SAMPLES - 24  # nothing consumed before was streamed again


# -- one process ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_is_the_ranks_batch_count_with_any_workers(address: str, drop_last: bool) -> None:
    seen = []
    for workers in (0, 1, 3):
        stream = _stream(
            datasource(address),
            shard_index=1,
            shard_count=2,
            drop_last=drop_last,
            epoch_options=EpochOptions(sample_subset=list(range(59))),
        )
        loader = torch_data.DataLoader(stream, batch_size=None, num_workers=workers)
        batches = record(loader)
        assert len(stream) == len(loader) == len(batches) == (7 if drop_last else 8)
        seen.append(batches)
    assert seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers(address: str, context: str) -> None:
    stream = _stream(datasource(address))
    loader = torch_data.DataLoader(
        stream, batch_size=None, num_workers=1, persistent_workers=True, multiprocessing_context=context
    )
    orders = []
    for epoch in (0, 1, 1):
        stream.set_epoch(epoch)
        orders.append(_indices(record(loader)))
    assert orders[0] != orders[1] == orders[2]
    assert all(sorted(order) == list(range(SAMPLES)) for order in orders)
    assert orders[1] == _indices(_epoch(_stream(datasource(address)), 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_dataloader_resumes_mid_epoch_without_streaming_again(address: str, workers: int) -> None:
    stream = _stream(datasource(address))
    stream.set_epoch(4)
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=workers)
    consumed: Batches = []
    for batch in loader:
        consumed.extend(record([batch]))
        if len(consumed) == 5:
            break
    state = loader.state_dict()
    full = _epoch(_stream(datasource(address)), 4)
    assert consumed == full[:5]

    ds = datasource(address)
    resumed_stream = _stream(ds)  # a new process would start at epoch 0: the state holds epoch 4
    resumed = StatefulDataLoader(resumed_stream, batch_size=None, num_workers=workers)
    resumed.load_state_dict(state)
    rest = record(resumed)
    assert rest == full[5:]
    assert ds.stats.snapshot().samples == SAMPLES - 5 * BATCH  # the server started at the cursor
    resumed_stream.set_epoch(5)
    assert record(resumed) == _epoch(_stream(datasource(address)), 5)  # then whole epochs again


def test_a_checkpoint_of_two_workers_resumes_with_one(address: str) -> None:
    stream = _stream(datasource(address))
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=2)
    consumed: Batches = []
    for batch in loader:
        consumed.extend(record([batch]))
        if len(consumed) == 7:
            break
    state = loader.state_dict()
    full = _epoch(_stream(datasource(address)), 0)

    refused = StatefulDataLoader(_stream(datasource(address)), batch_size=None, num_workers=1)
    refused.load_state_dict(state)
    with pytest.raises(ValueError, match=r"stream\.load_state_dict"):
        next(iter(refused))  # StatefulDataLoader hands worker 0 of 2's state to the only worker

    ds = datasource(address)
    elastic = _stream(ds)
    elastic.load_state_dict(state)  # the documented path: the stream takes the loader's whole state
    rest = record(StatefulDataLoader(elastic, batch_size=None, num_workers=1))
    assert rest == full[7:] and ds.stats.snapshot().samples == SAMPLES - 7 * BATCH
    again = record(torch_data.DataLoader(elastic, batch_size=None, num_workers=1))
    assert again == full  # the loaded state was taken by one iteration


def test_a_plain_dataloader_saves_with_consumed_batches(address: str) -> None:
    stream = _stream(datasource(address), shard_index=0, shard_count=2)
    state = stream.state_dict(consumed_batches=3)
    assert (state["epoch"], state["global_start"], state["batches"], state["worker_count"]) == (0, 0, 3, 1)
    other_rank = _stream(datasource(address), shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match="has not iterated"):
        other_rank.state_dict()
    ds = datasource(address)
    resumed = _stream(ds)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["global_start"] == 3 * BATCH * 2
    resumed.set_epoch(1)  # another epoch than the state's: the state is dropped
    assert _indices(record(torch_data.DataLoader(resumed, batch_size=None))) == _indices(
        _epoch(_stream(datasource(address)), 1)
    )


def test_a_state_of_another_stream_is_refused(address: str) -> None:
    state = _stream(datasource(address)).state_dict(consumed_batches=1)
    with pytest.raises(ValueError, match="another stream"):
        _stream(datasource(address), seed=SEED + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a stream state"):
        _stream(datasource(address)).load_state_dict({"epoch": 1})


# -- shapes ---------------------------------------------------------------------------------------------------------


def _vary(address: str) -> pw.RemoteDatasource:
    """Slices along the last axis of subjects with 20, 22 and 24 slices: (20 + 2i) x 24 x 2 images."""
    return pw.connect(address).datasource(
        "vary",
        extr.SliceIndexing(2),
        extr.ComposeExtractor(
            [extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS)), extr.SubjectExtractor()]
        ),
    )


def _shaped(address: str, shapes: str) -> tuple[pw.RemoteDatasource, list[Any], PytorchStreamingDataset]:
    ds = _vary(address)
    stream = PytorchStreamingDataset(ds, batch_size=6, shuffle=True, seed=1, shapes=shapes)
    return ds, list(torch_data.DataLoader(stream, batch_size=None)), stream


def test_samples_of_different_shapes_are_refused_with_the_options(address: str) -> None:
    with pytest.raises(ValueError) as info:
        _shaped(address, "error")
    message = str(info.value)
    assert "'images' arrays" in message and "(20, 24, 2)" in message and "(22, 24, 2)" in message
    assert all(option in message for option in ("shapes=", "'pad'", "'list'", "'group'"))
    assert "stack expects" not in message


def test_pad_zero_pads_each_batch_and_says_so(address: str) -> None:
    ds, batches, stream = _shaped(address, "pad")
    assert len(batches) == len(stream) == 8  # 48 slices
    for batch in batches:
        images, shapes = batch[defs.KEY_IMAGES], batch[PADDED_SHAPES][defs.KEY_IMAGES]
        assert tuple(images.shape[1:]) == tuple(shapes.max(dim=0).values.tolist())
        for row, i in enumerate(batch[defs.KEY_SAMPLE_INDEX].tolist()):
            own = ds[i][defs.KEY_IMAGES]
            assert tuple(shapes[row].tolist()) == own.shape
            region = tuple(slice(0, n) for n in own.shape)
            assert np.array_equal(images[row].numpy()[region], own)
            assert images[row].sum().item() == pytest.approx(float(own.sum()), rel=1e-5)  # zeros elsewhere
            assert batch[defs.KEY_LABELS][row].numpy()[region[:2]].shape[:2] == own.shape[:2]


def test_list_gives_per_sample_tensors(address: str) -> None:
    ds, batches, _ = _shaped(address, "list")
    for batch in batches:
        assert isinstance(batch[defs.KEY_IMAGES], list) and isinstance(batch[defs.KEY_SAMPLE_INDEX], torch.Tensor)
        for image, i in zip(batch[defs.KEY_IMAGES], batch[defs.KEY_SAMPLE_INDEX].tolist(), strict=True):
            assert np.array_equal(image.numpy(), ds[i][defs.KEY_IMAGES])


def test_group_splits_each_batch_by_shape_keeping_the_order(address: str) -> None:
    _, listed, _ = _shaped(address, "list")
    _, grouped, stream = _shaped(address, "group")
    assert len(grouped) == len(listed) == len(stream)  # one item per batch: ranks stay in lockstep
    for groups, batch in zip(grouped, listed, strict=True):
        shapes = [tuple(image.shape) for image in batch[defs.KEY_IMAGES]]
        first_seen = list(dict.fromkeys(shapes))
        assert [tuple(g[defs.KEY_IMAGES].shape[1:]) for g in groups] == first_seen
        indices = batch[defs.KEY_SAMPLE_INDEX].tolist()
        for group, shape in zip(groups, first_seen, strict=True):
            expected = [i for i, s in zip(indices, shapes, strict=True) if s == shape]
            assert group[defs.KEY_SAMPLE_INDEX].tolist() == expected
            assert len(group[defs.KEY_SUBJECT]) == len(expected)
    assert any(len(groups) > 1 for groups in grouped)


# -- the map-style adapter ------------------------------------------------------------------------------------------


def test_the_adapter_reads_each_epochs_randomness(address: str) -> None:
    ds = datasource(address)
    adapter = PytorchDatasetAdapter(ds, seed=SEED)
    loader = torch_data.DataLoader(adapter, batch_size=10, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in (0, 1):
        adapter.set_epoch(epoch)
        epochs.append(torch.cat([batch[defs.KEY_IMAGES] for batch in loader]))
        direct = ds.get_samples([0, 59], seed=SEED, epoch=epoch)
        assert np.array_equal(epochs[-1][0].numpy(), direct[0][defs.KEY_IMAGES])
        assert np.array_equal(epochs[-1][59].numpy(), direct[1][defs.KEY_IMAGES])
    assert not torch.equal(epochs[0], epochs[1])
    assert np.array_equal(adapter[3][defs.KEY_IMAGES], ds.get_samples([3], seed=SEED, epoch=1)[0][defs.KEY_IMAGES])
