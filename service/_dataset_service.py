"""DatasetService: datasets listed and described, samples read, extracted and streamed in batches.

Reads, extraction and encoding run on the server's executor threads; a stream prepares its next message while the
current one is sent, and stops building samples as soon as its call ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from patchwire.service import _selection
from patchwire.service._auth import current_identity
from patchwire.service._calls import current_call, describe_call
from patchwire.service._catalog import Dataset
from patchwire.service._codecs import OfferedCodecs
from patchwire.service._datasource import CompiledDatasource, DatasourceCache, direct_extract
from patchwire.service._epoch_order import consumer_share, global_order
from patchwire.service._errors import FailedPrecondition, InvalidArgument, translate_errors
from patchwire.service._extraction import image_properties
from patchwire.service._limits import Limits, check_sample_bytes, check_spec, exhausted
from patchwire.service._packed_samples import PackedSamples
from patchwire.service._randomness import Draw
from patchwire.service._served import ServedDataset
from patchwire.service._shared_regions import SharedRegions, named_region, write_payloads
from patchwire.v1 import dataset_service_pb2, dataset_service_pb2_grpc
from patchwire.wire import compression, framing, shared_memory, tensors
from patchwire.wire.batches import Encoded, encode_batch
from patchwire.wire.compression import RAW, Packed, Policy

__all__ = ["MAX_SAMPLES_PER_MESSAGE", "DatasetServicer"]

T = TypeVar("T")

#: Most samples in one message (bounds per-message overhead and latency for tiny samples such as voxels).
MAX_SAMPLES_PER_MESSAGE = 4096
SAMPLE_THREADS = max(1, min(8, len(os.sched_getaffinity(0))))
"""Threads that build the samples of one message together when building them is costly (random transforms, whose
numpy and scipy work runs without the GIL): the message's samples are built in waves of this many."""


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(
        self,
        datasets: Mapping[str, ServedDataset],
        executor: ThreadPoolExecutor,
        cache: DatasourceCache | None = None,
        limits: Limits | None = None,
        regions: SharedRegions | None = None,
        compressions: Sequence[str] = compression.SUPPORTED,
        packed: PackedSamples | None = None,
    ) -> None:
        """``regions``: the registry of same-host clients' shared-memory segments (None: shared memory is off).
        ``compressions``: the codecs clients may ask for, by name (``ServerConfig.compressions``; ValueError for a
        name this build does not know). ``packed``: where samples compressed for the wire are kept (None: none)."""
        self._packed = packed
        self._offered = OfferedCodecs(compressions)
        self._datasets = datasets
        self._regions = regions
        self._limits = limits if limits is not None else Limits()
        self._cache = cache if cache is not None else DatasourceCache(datasets, limits=self._limits)
        self._executor = executor
        self._sample_threads: ThreadPoolExecutor | None = None
        self.samples_built = 0
        """Samples read and transformed for GetSamples, StreamBatches and SelectIndices so far (what calls cost)."""

    def _samples_in_waves(self, src: CompiledDatasource) -> tuple[int, ThreadPoolExecutor | None]:
        """(wave width, its threads): samples of a costly datasource are built SAMPLE_THREADS at a time (made on
        first use), others one by one on the calling thread."""
        if not src.costly or SAMPLE_THREADS == 1:
            return 1, None
        if self._sample_threads is None:
            self._sample_threads = ThreadPoolExecutor(SAMPLE_THREADS, thread_name_prefix="patchwire-samples")
        return SAMPLE_THREADS, self._sample_threads

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _policy(self, request: Any) -> Policy:
        """The codecs a GetSamples or StreamBatches request asks for (``compression`` for every tensor, else
        ``integer_compression`` for integer and bool ones), each one this server offers (else INVALID_ARGUMENT).
        A message's frames are compressed on the sample threads, in parallel: one stream's messages are built one
        at a time, so one core's compression speed would otherwise bound a stream."""
        policy = Policy.of_request(
            self._offered.check(request.compression, "compression"),
            self._offered.check(request.integer_compression, "integer_compression"),
        )
        if not policy.active or SAMPLE_THREADS == 1:
            return policy
        if self._sample_threads is None:
            self._sample_threads = ThreadPoolExecutor(SAMPLE_THREADS, thread_name_prefix="patchwire-samples")
        return dataclasses.replace(policy, threads=self._sample_threads)

    @translate_errors
    async def ListDatasets(self, request: Any, context: Any) -> dataset_service_pb2.ListDatasetsResponse:
        return await self._run(_summaries, self._datasets)

    @translate_errors
    async def DescribeDataset(self, request: Any, context: Any) -> dataset_service_pb2.DescribeDatasetResponse:
        ds = self._cache.dataset(request.dataset)
        return await self._run(self._cache.consistent, ds, lambda: _describe(ds))

    @translate_errors
    async def OpenDatasource(self, request: Any, context: Any) -> dataset_service_pb2.OpenDatasourceResponse:
        src = await self._run(self._cache.get, request.spec)
        return dataset_service_pb2.OpenDatasourceResponse(
            length=src.length,
            subjects=[
                dataset_service_pb2.SubjectSamples(subject_index=s, first_sample_index=start, sample_count=count)
                for s, start, count in zip(src.subject_indices, src.starts, src.counts, strict=True)
            ],
        )

    @translate_errors
    async def GetSamples(self, request: Any, context: Any) -> AsyncIterator[dataset_service_pb2.GetSamplesResponse]:
        policy = self._policy(request)
        if len(request.sample_indices) > self._limits.max_indices:
            raise exhausted(
                f"sample_indices: {len(request.sample_indices)} indices in one request",
                self._limits.max_indices,
                "--max-indices",
            )

        def resolved() -> tuple[CompiledDatasource, list[int]]:  # in the executor: the loop never walks the indices
            src = self._cache.get(request.spec)
            indices = [int(i) for i in request.sample_indices]
            for i in indices:
                src.subject_of(i)
            return src, indices

        deliver = None
        if request.HasField("shared_memory"):
            region = named_region(
                self._regions, request.shared_memory.region, current_identity(), False, "shared_memory"
            )
            deliver = _SharedDelivery(region.segment)
            policy = RAW  # nothing crosses a link
        src, indices = await self._run(resolved)
        describe_call(request.spec, src.dataset.name)
        # the caller waits for every sample: as many per message as fit TARGET_MESSAGE_BYTES, from the first one
        async for message in self._stream(
            src,
            indices,
            1,
            dataset_service_pb2.GetSamplesResponse,
            compression=policy,
            first=len(indices),
            budget=framing.TARGET_MESSAGE_BYTES,
            deliver=deliver,
            draws=(int(request.seed), int(request.epoch), None),
        ):
            yield message

    @translate_errors
    async def DirectExtract(self, request: Any, context: Any) -> AsyncIterator[Any]:
        ds = self._cache.dataset(request.extraction.dataset, "extraction.dataset")
        check_spec(request.extraction, self._limits, "extraction")

        def extract() -> Encoded:
            sample = direct_extract(ds, request.extraction, self._limits.max_sample_bytes)
            check_sample_bytes(_sample_bytes(sample), self._limits.max_sample_bytes)
            return encode_batch([sample])

        encoded = await self._run(self._cache.consistent, ds, extract)
        call = describe_call(request.extraction, ds.name, "direct")
        if call is not None:
            call.served(1, encoded.nbytes)
        for message in encoded.messages(dataset_service_pb2.DirectExtractResponse):
            yield message

    @translate_errors
    async def SelectIndices(self, request: Any, context: Any) -> AsyncIterator[Any]:
        src = await self._run(self._cache.get, request.spec)

        def prepared() -> _selection.SelectionScan:  # in the executor: subject names resolve against the dataset
            selection = _selection.compile_selection(request.selection, src.dataset, self._limits)
            return _selection.SelectionScan(src, selection, int(request.seed), int(request.epoch))

        scan = await self._run(prepared)
        stopped = threading.Event()
        most = _selection.MAX_INDICES_PER_MESSAGE

        def step(want: int) -> list[int]:  # a bounded step of the scan, with the file checked around it
            indices, built = self._cache.consistent(src.dataset, lambda: scan.step(want, stopped))
            self.samples_built += built
            return indices

        try:
            accepted: list[int] = []
            while not scan.done:
                accepted.extend(await self._run(step, most - len(accepted)))
                if len(accepted) == most or (scan.done and accepted):
                    yield dataset_service_pb2.SelectIndicesResponse(indices=accepted)
                    accepted = []
        finally:
            stopped.set()  # a cancelled call: the step in the executor ends within one sample

    @translate_errors
    async def StreamBatches(self, request: Any, context: Any) -> AsyncIterator[Any]:
        shard_count = request.shard_count or 1
        if request.batch_size <= 0:
            raise InvalidArgument(f"batch_size: must be positive, got {request.batch_size}")
        if request.batch_size > self._limits.max_batch_size:
            raise exhausted(
                f"batch_size: {request.batch_size} samples", self._limits.max_batch_size, "--max-batch-size"
            )
        if shard_count < 0:
            raise InvalidArgument(f"shard_count: must be positive, got {shard_count}")
        if not 0 <= request.shard_index < shard_count:
            raise InvalidArgument(f"shard_index: {request.shard_index} must be in [0, shard_count={shard_count})")
        if request.start_position < 0:
            raise InvalidArgument(f"start_position: must not be negative, got {request.start_position}")
        policy = self._policy(request)
        src = await self._run(self._cache.get, request.spec)
        if src.extractor is None:
            raise InvalidArgument("spec.extractor: streaming samples needs an extractor")
        describe_call(request.spec, src.dataset.name)

        def ordered() -> tuple[np.ndarray | range, np.ndarray | range]:  # in the executor: orders can be long
            order = global_order(request, src.length, src.starts, self._limits)
            share = consumer_share(request, len(order))
            return share.indices(order, request.global_start), share.positions

        indices, positions = await self._run(ordered)
        async for message in self._stream(
            src,
            indices,
            request.batch_size,
            dataset_service_pb2.StreamBatchesResponse,
            first_position=request.start_position,
            compression=policy,
            draws=(int(request.seed), int(request.epoch), positions),
        ):
            yield message

    async def _stream(
        self,
        src: CompiledDatasource,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        response_type: Any,
        first_position: int = 0,
        compression: Policy = RAW,
        first: int | None = None,
        budget: int | None = None,
        deliver: _SharedDelivery | None = None,
        draws: tuple[int, int, np.ndarray | range | None] = (0, 0, None),
    ) -> AsyncIterator[Any]:
        """Sends ``indices`` in messages of whole batches sized towards TARGET_MESSAGE_BYTES, one message ahead.
        The first message holds ``first`` samples (default one batch: a short time to first batch); with ``budget``
        (batches of one sample only) a message also ends once its samples hold that many bytes. Messages are built
        in the executor, which stops within one sample once the call ends (``stopped``); a sample over
        ``max_sample_bytes`` or a message over ``max_batch_bytes`` ends the call with RESOURCE_EXHAUSTED. With
        ``deliver`` (a client's segment) a message's payloads are written there, where they fit, and the message
        carries their offsets instead of being followed by chunks. ``draws``: (seed, epoch, positions) of the
        samples' randomness; positions aligned with ``indices`` (None: each sample's index). ``compression``: the
        codec per dtype; tensors are compressed where messages are built, in the executor."""
        stopped = threading.Event()
        seed, epoch, positions = draws
        call = current_call()  # what the stream delivers is counted on it (ListStreams, metrics)
        limits = self._limits

        def build(start: int, count: int) -> tuple[Encoded, list[int] | None] | None:
            chunk = [int(i) for i in indices[start : start + count]]
            if positions is None:  # each sample's own index (negative ones count from the end, as in pymia)
                where = [i + src.length if i < 0 else i for i in chunk]
            else:
                where = [int(p) for p in positions[start : start + count]]

            # deterministic samples compressed for the wire are kept, and sent again as they are
            packing = None if deliver is not None or self._packed is None else self._packed.begin(src, compression)

            def make(i: int, position: int) -> dict[str, Any]:
                draw = Draw(seed, epoch, position, i + src.length if i < 0 else i)
                return src.sample(i, draw) if packing is None else packing.sample(i, draw)

            def made() -> Iterator[tuple[int, dict[str, Any]]]:
                """(index, sample) in order; costly samples built a wave at a time by several threads (within
                the message's byte limit: a wave is at most SAMPLE_THREADS samples beyond it)."""
                width, threads = self._samples_in_waves(src) if budget is None else (1, None)
                pairs = list(zip(chunk, where, strict=True))
                for w in range(0, len(pairs), width):
                    if stopped.is_set():
                        return
                    wave = pairs[w : w + width]
                    if threads is None:
                        yield wave[0][0], make(*wave[0])
                        continue
                    yield from zip((i for i, _ in wave), threads.map(lambda p: make(*p), wave), strict=True)

            def built() -> tuple[Encoded, list[int] | None] | None:
                samples, nbytes = [], 0
                for i, sample in made():
                    self.samples_built += 1
                    size = _sample_bytes(sample)
                    check_sample_bytes(size, limits.max_sample_bytes, f"sample {i}")
                    nbytes += size
                    if nbytes > limits.max_batch_bytes:
                        raise exhausted(
                            f"batch: samples from position {first_position + start} hold over {nbytes} bytes",
                            limits.max_batch_bytes / (1 << 20),
                            "--max-batch-mb",
                            " MB",
                        )
                    samples.append(sample)
                    if budget is not None and nbytes >= budget:
                        break
                if stopped.is_set():
                    return None
                if packing is not None:
                    samples = packing.finish(samples)
                # for a segment, strided arrays (a Permute's) are copied once, straight into it
                encoded = encode_batch(
                    samples, chunk[: len(samples)], first_position + start, compression, contiguous=deliver is None
                )
                offsets = None if deliver is None else deliver.place(encoded)
                if deliver is not None and offsets is None:
                    encoded.make_contiguous()  # for the wire after all (copied here, not on the event loop)
                return encoded, offsets

            # the file is checked before and after: nothing read across a change is sent
            return self._cache.consistent(src.dataset, built)

        start, per_message = 0, batch_size if first is None else first
        pending = asyncio.ensure_future(self._run(build, start, per_message)) if len(indices) else None
        try:
            while pending is not None:
                done = await pending
                assert done is not None  # (None only once stopped)
                encoded, offsets = done
                count = len(encoded.batch.sample_indices)
                start += count
                if call is not None:
                    call.served(count, encoded.nbytes)
                pending = None
                if start < len(indices):
                    # sized by the arrays' bytes, compressed or not: the byte limits and the client's memory count those
                    per_sample = max(encoded.raw_nbytes / max(count, 1), 1.0)
                    batches = max(1, math.floor(framing.TARGET_MESSAGE_BYTES / (per_sample * batch_size)))
                    per_message = min(batches * batch_size, max(MAX_SAMPLES_PER_MESSAGE, batch_size))
                    pending = asyncio.ensure_future(self._run(build, start, per_message))
                if offsets is not None:  # its payloads lie in the client's segment
                    yield response_type(batch=encoded.batch, shared_offsets=offsets)
                    continue
                # chunk messages are made one at a time as gRPC takes them: a batch's payload is not held twice
                for message in encoded.messages(response_type):
                    yield message
        finally:
            stopped.set()
            if pending is not None:
                pending.cancel()


class _SharedDelivery:
    """A GetSamples call's payloads written into the caller's segment, one message after another (messages are built
    one at a time, in order)."""

    def __init__(self, segment: shared_memory.OpenedSegment) -> None:
        self._segment = segment
        self._end = shared_memory.HEADER_BYTES

    def place(self, encoded: Encoded) -> list[int] | None:
        """The offsets of the message's payloads, written into the segment; None where it has none or they do not fit
        (they follow as chunks)."""
        if not encoded.payloads:
            return None
        written = write_payloads(self._segment, encoded.batch, encoded.payloads, self._end)
        if written is None:
            return None
        offsets, self._end = written
        return offsets


def _sample_bytes(sample: Mapping[str, Any]) -> int:
    """The array bytes of a sample (what its encoding grows with; raw bytes for arrays kept compressed)."""
    return sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray | np.generic | Packed))


def _summaries(datasets: Mapping[str, ServedDataset]) -> dataset_service_pb2.ListDatasetsResponse:
    out = dataset_service_pb2.ListDatasetsResponse()
    for name, served in datasets.items():
        served.refresh()  # a file that changed is opened again (or found unusable) before it is listed
        try:
            ds = served.current()
        except FailedPrecondition:
            out.datasets.add(name=name, unavailable=True, unavailable_reason=served.public_reason or "unavailable")
            continue
        out.datasets.add(name=name, subject_count=len(ds.subjects), categories=ds.categories)
    return out


def _describe(ds: Dataset) -> dataset_service_pb2.DescribeDatasetResponse:
    out = dataset_service_pb2.DescribeDatasetResponse(name=ds.name)
    for cat in ds.categories:
        out.categories.add(name=cat, entry_names=ds.entry_names.get(cat, []))
    for s, name in enumerate(ds.subjects):
        subject = out.subjects.add(index=s, name=name)
        for cat, shape, dtype, is_string in ds.array_info(s):
            info = subject.arrays.add(category=cat, shape=shape, is_string=is_string)
            if not is_string:
                info.dtype = tensors.dtype_to_proto(dtype)
        if ds.geometry is not None:
            subject.image_properties.CopyFrom(image_properties(ds.geometry[s]).to_proto())
    return out
