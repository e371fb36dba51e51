"""Ranks of a real gloo process group for the torch distributed tests.

The test starts each rank as a spawned process (:func:`run_ranks`); a rank joins the group through a file store
(gloo then talks over the loopback interface only), connects to the test's server, runs :func:`scenarios` with
DataLoader workers forked from it, and writes what it saw to a pickle. Every batch is followed by an all-reduce, as
DDP's gradient synchronisation would be, so ranks that streamed different numbers of batches fail (at the group's
timeout) instead of passing.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import traceback
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.data as torch_data

import patchwire.client as pw
from patchwire.client import augmentation as aug
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.client._epochs import EpochOptions
from patchwire.client.torch import PytorchStreamingDataset

BATCH = 4
SEED = 3
GROUP_TIMEOUT_S = 60  # a bound for a collective that never completes, never a pace
Batches = list[tuple[list[int], list[str]]]


def datasource(address: str) -> pw.RemoteDatasource:
    """The "tiny" dataset's axial slices (60), images only, randomly flipped and noised on the server."""
    return pw.connect(address).datasource(
        "tiny",
        extr.SliceIndexing(),
        extr.DataExtractor(categories=(defs.KEY_IMAGES,)),
        tfm.ComposeTransform(
            [aug.RandomFlip(axes=(0, 1), entries=(defs.KEY_IMAGES,)), aug.RandomNoise(std=(0.5, 1.0))]
        ),
    )


def digests(batch: dict[str, Any]) -> list[str]:
    """A digest of each sample's image bytes."""
    return [hashlib.sha256(image.numpy().tobytes()).hexdigest()[:16] for image in batch[defs.KEY_IMAGES]]


def record(batches: Iterable[dict[str, Any]], lockstep: bool = False) -> Batches:
    """Each batch's sample indices and image digests (an all-reduce after each batch with ``lockstep``)."""
    out: Batches = []
    for batch in batches:
        out.append((batch[defs.KEY_SAMPLE_INDEX].tolist(), digests(batch)))
        if lockstep:
            dist.all_reduce(torch.ones(1))
    return out


def scenarios(address: str) -> dict[str, Any]:
    """What one rank sees: the shard it takes, two epochs with persistent workers, balanced shards of an odd epoch
    and a torchdata checkpoint taken after three batches of epoch 2."""
    ds = datasource(address)
    out: dict[str, Any] = {}
    stream = PytorchStreamingDataset(ds, batch_size=BATCH, shuffle=True, seed=SEED)
    loader = torch_data.DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    out["shard"] = (stream.shard_index, stream.shard_count)
    out["len"] = (len(stream), len(loader))
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        out[f"epoch{epoch}"] = record(loader, lockstep=True)
    for balance in ("pad", "drop"):
        odd = PytorchStreamingDataset(
            ds,
            batch_size=BATCH,
            shuffle=True,
            seed=SEED,
            shard_balance=balance,
            epoch_options=EpochOptions(sample_subset=list(range(59))),
        )
        out[balance] = record(torch_data.DataLoader(odd, batch_size=None, num_workers=2), lockstep=True)
    from torchdata.stateful_dataloader import StatefulDataLoader

    stream = PytorchStreamingDataset(ds, batch_size=BATCH, shuffle=True, seed=SEED)
    stream.set_epoch(2)
    stateful = StatefulDataLoader(stream, batch_size=None, num_workers=2)
    consumed: Batches = []
    for batch in stateful:
        consumed.extend(record([batch], lockstep=True))
        if len(consumed) == 3:
            break
    out["checkpoint"] = (consumed, stateful.state_dict())
    explicit = PytorchStreamingDataset(ds, batch_size=BATCH, shard_index=0, shard_count=1)
    out["explicit"] = (explicit.shard_index, explicit.shard_count, len(explicit))
    return out


def run_rank(rank: int, world: int, store: str, address: str, out: str) -> None:
    """One rank (the target of a spawned process): joins the group, runs the scenarios, writes the result."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=GROUP_TIMEOUT_S),
        )
        try:
            result: dict[str, Any] = scenarios(address)
        finally:
            dist.destroy_process_group()
    except BaseException:
        result = {"error": traceback.format_exc()}
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_ranks(world: int, address: str, directory: Path, wait_s: float) -> list[dict[str, Any]]:
    """Runs ``world`` ranks as spawned processes; each rank's result (or an assertion error with its traceback)."""
    context = multiprocessing.get_context("spawn")
    store = directory / "store"
    processes = [
        context.Process(target=run_rank, args=(rank, world, str(store), address, str(directory)))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(wait_s)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    results = []
    for rank, process in enumerate(processes):
        assert process.exitcode == 0, f"rank {rank} exited with {process.exitcode}"
        with open(directory / f"rank{rank}.pkl", "rb") as f:
            result = pickle.load(f)
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        results.append(result)
    return results
