"""RemoteDatasource: pymia's PymiaDatasource, served by a patchwire server."""

from __future__ import annotations

import operator
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from patchwire.client import _compression
from patchwire.client import definition as defs
from patchwire.client._connection import Connection
from patchwire.client._decoding import DecodedBatch, decode_stream
from patchwire.client._epochs import EpochOptions
from patchwire.client._prefetch import prefetched
from patchwire.client._resume import read_with_retries, resumed_stream
from patchwire.client._retry import RetryPolicy
from patchwire.client._shared_reads import SharedReads
from patchwire.client._stats import LoaderStats, received, recorded
from patchwire.client.transformation import split_transform
from patchwire.v1 import dataset_service_pb2, spec_pb2
from patchwire.wire import compression as _codecs
from patchwire.wire.batches import same_shape_and_dtype

if TYPE_CHECKING:
    from patchwire.client.extraction import Extractor, IndexingStrategy
    from patchwire.client.indexexpression import IndexExpression

__all__ = ["RemoteDatasource", "SubjectSamples"]

ClientStep = Callable[[dict[str, Any]], Any]
T = TypeVar("T")
#: Decoded messages a stream keeps ready ahead of its consumer (see ``_prefetch``).
PREFETCH_MESSAGES = 2
GET_SAMPLES = "/patchwire.v1.DatasetService/GetSamples"
DIRECT_EXTRACT = "/patchwire.v1.DatasetService/DirectExtract"
STREAM_BATCHES = "/patchwire.v1.DatasetService/StreamBatches"


@dataclass(frozen=True)
class SubjectSamples:
    """The samples of one subject: ``range(first_sample_index, first_sample_index + sample_count)``."""

    subject_index: int
    first_sample_index: int
    sample_count: int


def _client_side(
    extractor: Extractor | None, transform: Any
) -> tuple[spec_pb2.Transform | None, set[str], list[ClientStep]]:
    server_transform, client_steps = split_transform(transform)
    pickled = extractor._pickled_keys() if extractor is not None else set()
    return server_transform, pickled, client_steps


def _finish(sample: dict[str, Any], pickled: set[str], steps: list[ClientStep]) -> dict[str, Any]:
    """What happens after receipt, in pymia's order: pickling (inside extraction), then client-side transforms."""
    for key in pickled & sample.keys():
        sample[key] = pickle.dumps(sample[key])
    for step in steps:
        sample = step(sample)
    return sample


class RemoteDatasource:
    """The samples of a served dataset: ``len(ds)``, ``ds[i]``, ``direct_extract``, ``get_subjects`` as in pymia,
    plus :meth:`batches`, a fast batched stream (shuffled, sharded, resumable).

    Build it with :meth:`patchwire.client.Client.datasource`. The spec is validated by the server when the
    datasource is made, so bad parameters fail here, not at the first sample. A datasource can be pickled and
    used from forked or spawned worker processes: each process opens its own channel.

    Every read has a deadline (``Timeouts``); reads and streams are retried under ``retry`` while the server is
    unreachable or restarting, a stream resuming at the first sample not yet delivered (:mod:`._resume`).
    """

    def __init__(
        self,
        connection: Connection,
        dataset: str,
        indexing_strategy: IndexingStrategy | None,
        extractor: Extractor | None,
        transform: Any,
        subject_subset: Sequence[str] | None,
        label_compression: str | None,
        retry: RetryPolicy | None = None,
        shared_memory: bool = True,
        compression: str = _compression.AUTO,
    ) -> None:
        """Opens the datasource on the server (the arguments and their defaults are those of
        :meth:`patchwire.client.Client.datasource`, which builds it)."""
        self._connection = connection
        self.retry = retry or RetryPolicy()
        """How long reads and streams are retried while the server is unreachable or restarting."""
        self.retries = 0
        """Attempts repeated so far after a retriable failure (counted in this process)."""
        self.dataset = dataset
        self.label_compression = label_compression
        self._compression = _codecs.compression_from_name(label_compression)
        self.compression = _compression.check_option(compression)
        """What this datasource asks the server to compress with: "auto", "none" or a codec name (see
        :attr:`codec`)."""
        self.indexing_strategy = indexing_strategy
        self.extractor = extractor
        self.transform = transform
        self.subject_subset = None if subject_subset is None else list(subject_subset)
        self.stats = LoaderStats()
        """Samples, bytes, waits and retries of this datasource's loops (see :class:`LoaderStats`)."""
        self._shared = SharedReads(connection, shared_memory)
        self._open()
        self._codec = _compression.resolve(self.compression, connection)

    @property
    def codec(self) -> str:
        """The codec tensors travel with over the wire ("none" where they travel raw): :attr:`compression` resolved
        against this server (``"auto"``: on for a server on another host that offers a codec). Reads through shared
        memory are never compressed."""
        return _codecs.codec_name(self._codec)

    @property
    def wire_codec(self) -> int:
        """:attr:`codec`'s wire value (``Tensor.compression``)."""
        return int(self._codec)

    def _open(self) -> None:
        spec = spec_pb2.DatasourceSpec(dataset=self.dataset)
        if self.indexing_strategy is not None:
            spec.indexing_strategy.CopyFrom(self.indexing_strategy._to_proto())
        if self.extractor is not None:
            spec.extractor.CopyFrom(self.extractor._to_proto())
        server_transform, self._pickled, self._client_steps = _client_side(self.extractor, self.transform)
        if server_transform is not None:
            spec.transform.CopyFrom(server_transform)
        if self.subject_subset is not None:
            spec.subject_subset.values.extend(self.subject_subset)
        self._spec = spec
        response = self._read(
            f"opening a datasource on dataset {self.dataset!r}",
            lambda: self._connection.datasets.OpenDatasource(
                dataset_service_pb2.OpenDatasourceRequest(spec=spec), timeout=self._connection.timeouts.unary_s
            ),
        )
        self._length = int(response.length)
        self.subjects = [
            SubjectSamples(s.subject_index, s.first_sample_index, s.sample_count) for s in response.subjects
        ]

    # -- pymia's interface ---------------------------------------------------------------------------------------

    def set_indexing_strategy(
        self, indexing_strategy: IndexingStrategy, subject_subset: Sequence[str] | None = None
    ) -> None:
        self.indexing_strategy = indexing_strategy
        self.subject_subset = None if subject_subset is None else list(subject_subset)
        self._open()

    def set_extractor(self, extractor: Extractor) -> None:
        self.extractor = extractor
        self._open()

    def set_transform(self, transform: Any) -> None:
        self.transform = transform
        self._open()

    def __len__(self) -> int:
        return self._length

    @property
    def uses_shared_memory(self) -> bool | None:
        """Whether this process reads samples (``ds[i]``, ``get_samples``) through shared memory: True once a segment
        was registered with the server, False where none can be (another host, shared memory off on either side),
        None before the first read."""
        return self._shared.usable

    def __getitem__(self, item: int) -> dict[str, Any]:
        if isinstance(item, slice):
            raise TypeError("RemoteDatasource takes one integer index; use batches() for many samples")
        (sample,) = self.get_samples([operator.index(item)])  # a float or str is a TypeError, as for a list
        return sample

    @recorded
    def get_samples(
        self, indices: Sequence[int], seed: int = 0, epoch: int = 0, *, retry: RetryPolicy | None = None
    ) -> list[dict[str, Any]]:
        """``[ds[i] for i in indices]`` in one call; ``seed`` and ``epoch`` seed the server's random transforms and
        patch sampling (each sample's draws depend on them and its index only, so a call repeats exactly); ``retry``:
        this call's retries instead of the datasource's."""
        what = f"reading samples {list(indices)[:8]}{'...' if len(indices) > 8 else ''} of dataset {self.dataset!r}"

        def read() -> list[DecodedBatch]:
            request = dataset_service_pb2.GetSamplesRequest(
                spec=self._spec, sample_indices=indices, integer_compression=self._compression, seed=seed, epoch=epoch
            )
            target = self._shared.target()
            if target is not None:
                request.shared_memory.region = target.region  # (nothing crosses a link: never compressed)
            else:
                request.compression = self._codec
            call = self._connection.raw_stream(GET_SAMPLES)(request, timeout=self._connection.timeouts.read_s)
            ok = False
            try:
                decoded = list(
                    decode_stream(
                        call,
                        self._connection.buffers,
                        None if target is None else target.payloads,
                        self.stats.add_wire_bytes,
                    )
                )
                if target is not None:  # the payloads came raw, through shared memory: no compression to report
                    self.stats.add_wire_bytes(sum(received(batch.samples())[1] for batch in decoded))
                ok = True
            finally:
                if target is not None:
                    target.finish(ok)
            return decoded

        out = []
        for decoded in self._read(what, read, retry):
            for i, sample in zip(decoded.sample_indices, decoded.samples(), strict=True):
                sample = _finish(sample, self._pickled, self._client_steps)
                sample[defs.KEY_SAMPLE_INDEX] = i
                out.append(sample)
        return out

    def direct_extract(
        self, extractor: Extractor, subject_index: int, index_expr: IndexExpression | None = None, transform: Any = None
    ) -> dict[str, Any]:
        """Extracts from one subject with any extractor, ignoring this datasource's indexing (pymia's)."""
        server_transform, pickled, steps = _client_side(extractor, transform)
        extraction = spec_pb2.DirectExtraction(
            dataset=self.dataset, extractor=extractor._to_proto(), subject_index=int(subject_index)
        )
        if index_expr is not None:
            extraction.index_expression.CopyFrom(index_expr.to_proto())
        if server_transform is not None:
            extraction.transform.CopyFrom(server_transform)
        request = dataset_service_pb2.DirectExtractRequest(extraction=extraction)
        timeout = self._connection.timeouts.read_s
        (decoded,) = self._read(
            f"direct extraction from subject {subject_index} of dataset {self.dataset!r}",
            lambda: list(decode_stream(self._connection.raw_stream(DIRECT_EXTRACT)(request, timeout=timeout))),
        )
        return _finish(decoded.sample(0), pickled, steps)

    def get_subjects(self) -> list[str]:
        """Names of all subjects of the dataset, in file order (as pymia: the subset does not apply)."""
        response = self._read(
            f"describing dataset {self.dataset!r}",
            lambda: self._connection.datasets.DescribeDataset(
                dataset_service_pb2.DescribeDatasetRequest(dataset=self.dataset),
                timeout=self._connection.timeouts.unary_s,
            ),
        )
        return [s.name for s in response.subjects]

    def _read(self, what: str, call: Callable[[], T], retry: RetryPolicy | None = None) -> T:
        """``call()`` with errors translated (naming the server), retried under ``retry`` (default ``self.retry``)."""
        address = self._connection.address
        policy = self.retry if retry is None else retry
        return read_with_retries(policy, address, f"{what} at {address}", call, self._count_retry)

    def _count_retry(self) -> None:
        self.retries += 1
        self.stats.add_retry()

    # -- streaming ------------------------------------------------------------------------------------------------

    def _stream(
        self,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        shard_index: int,
        shard_count: int,
        drop_last: bool,
        start_position: int,
        prefetch: int,
        epoch_options: EpochOptions | None = None,
    ) -> Iterator[DecodedBatch]:
        """The stream's batches, resumed at the cursor after a retriable failure (no deadline: see _timeouts)."""
        request = dataset_service_pb2.StreamBatchesRequest(
            spec=self._spec,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            shard_index=shard_index,
            shard_count=shard_count,
            drop_last=drop_last,
            start_position=start_position,
            integer_compression=self._compression,
            compression=self._codec,
        )
        if epoch_options is not None:
            epoch_options.fill(request)

        def from_position(position: int) -> Iterator[DecodedBatch]:
            resumed = dataset_service_pb2.StreamBatchesRequest()
            resumed.CopyFrom(request)
            resumed.start_position = position
            return self._stream_from(resumed, prefetch)

        address = self._connection.address
        what = f"streaming dataset {self.dataset!r} from {address}"
        return resumed_stream(from_position, start_position, self.retry, address, what, self._count_retry)

    def _stream_from(self, request: dataset_service_pb2.StreamBatchesRequest, prefetch: int) -> Iterator[DecodedBatch]:
        batch_size = request.batch_size
        call = self._connection.raw_stream(STREAM_BATCHES)(request)
        pool = self._connection.buffers
        on_wire = self.stats.add_wire_bytes
        decoded_messages = (
            prefetched(lambda: decode_stream(call, pool, on_wire=on_wire), prefetch, call.cancel)
            if prefetch > 0
            else decode_stream(call, pool, on_wire=on_wire)
        )
        try:
            for decoded in decoded_messages:
                yield from decoded.split(batch_size)
        finally:
            call.cancel()
            decoded_messages.close()  # a consumer that stops early: the prefetch thread ends here, not at collection

    @recorded
    def batches(
        self,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        drop_last: bool = False,
        start_position: int = 0,
        prefetch: int = PREFETCH_MESSAGES,
        epoch_options: EpochOptions | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Streams this consumer's share of an epoch as batches: dicts of stacked arrays (or lists where samples
        differ in shape or are not arrays) with ``sample_index`` as an int64 array.

        ``shuffle`` orders the epoch by a permutation derived from (``seed``, ``epoch``) alone; consumer
        ``shard_index`` of ``shard_count`` takes every ``shard_count``-th sample of that order, so the shards are
        disjoint and together cover the epoch once. ``start_position`` skips that many of this consumer's samples
        (resume). ``epoch_options`` (:class:`EpochOptions`): a subset, weights, subject windows, balanced shards, an
        elastic start and per-worker batch shards. The server sends several batches per message when samples are
        small and streams big tensors in chunks; the next message is prepared while this one is consumed. A thread
        receives and decodes up to ``prefetch`` messages ahead of the consumer (0: decode on the consumer's thread),
        so a training step and the stream overlap.
        """
        for decoded in self._stream(
            batch_size,
            shuffle,
            seed,
            epoch,
            shard_index,
            shard_count,
            drop_last,
            start_position,
            prefetch,
            epoch_options,
        ):
            if self._pickled or self._client_steps:
                samples = [_finish(s, self._pickled, self._client_steps) for s in decoded.samples()]
                batch = _collate(samples)
            else:
                batch = dict(decoded.columns)
            batch[defs.KEY_SAMPLE_INDEX] = np.asarray(decoded.sample_indices, dtype=np.int64)
            yield batch

    @recorded
    def samples(
        self,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        start_position: int = 0,
        prefetch: int = PREFETCH_MESSAGES,
        epoch_options: EpochOptions | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Streams samples one by one (as ``ds[i]`` returns them) in this consumer's order; see :meth:`batches`."""
        for decoded in self._stream(
            64, shuffle, seed, epoch, shard_index, shard_count, False, start_position, prefetch, epoch_options
        ):
            for i, sample in zip(decoded.sample_indices, decoded.samples(), strict=True):
                sample = _finish(sample, self._pickled, self._client_steps)
                sample[defs.KEY_SAMPLE_INDEX] = i
                yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.samples()

    def __repr__(self) -> str:
        return (
            f"RemoteDatasource({self._connection.address}, {self.dataset!r}, {self.indexing_strategy!r}, "
            f"{len(self)} samples)"
        )

    def close(self) -> None:
        self._connection.close()

    def select(self, selection: spec_pb2.Selection, seed: int = 0, epoch: int = 0) -> list[int]:
        """The indices of the samples ``selection`` accepts, ascending, evaluated by the server on the samples as it
        makes them (after extraction and the server's part of the transform; client-side callables do not run),
        each drawing its randomness from (``seed``, ``epoch``, its index). Like a stream it has no
        deadline (it may scan every sample); a retriable failure repeats the whole call.
        :func:`patchwire.client.selection.select_indices` builds ``selection`` from pymia's strategies."""
        request = dataset_service_pb2.SelectIndicesRequest(spec=self._spec, selection=selection, seed=seed, epoch=epoch)

        def read() -> list[int]:
            call = self._connection.datasets.SelectIndices(request)
            try:
                indices: list[int] = []
                for response in call:
                    indices.extend(response.indices)
                return indices
            finally:
                call.cancel()  # an interrupted caller: the server stops scanning

        return self._read(f"selecting samples of dataset {self.dataset!r}", read)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = np.stack(values) if same_shape_and_dtype(values) else values
    return out
