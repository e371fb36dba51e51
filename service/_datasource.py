"""A compiled datasource: pymia's PymiaDatasource, on the server, from a DatasourceSpec."""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from patchwire.service._catalog import Dataset
from patchwire.service._errors import InvalidArgument, NotFound, OutOfRange, bounded, bounded_list
from patchwire.service._extraction import Extractor, Params, compile_extractor
from patchwire.service._indexing import Expression, Indexing, compile_indexing
from patchwire.service._limits import Limits, check_spec
from patchwire.service._randomness import Draw
from patchwire.service._sampling import PatchSampler, compile_sampler
from patchwire.service._transforms import Transform, augments, compile_transform, writes_in_place
from patchwire.v1 import spec_pb2
from patchwire.wire.indexexpression import expression_from_proto

if TYPE_CHECKING:
    from patchwire.service._served import ServedDataset

__all__ = ["CompiledDatasource", "DatasourceCache", "direct_extract"]

T = TypeVar("T")


class CompiledDatasource:
    """Samples of one dataset under one indexing strategy, extractor, transform and subject subset."""

    def __init__(self, dataset: Dataset, spec: spec_pb2.DatasourceSpec, max_sample_bytes: int | None = None) -> None:
        self.dataset = dataset
        strategy = spec.indexing_strategy if spec.HasField("indexing_strategy") else None
        self.sampler: PatchSampler | None = None
        """Set for random patches (PatchSampling): each sample's window comes from its draw, not from its index."""
        if strategy is not None and strategy.WhichOneof("strategy") == "patch_sampling":
            self.sampler = compile_sampler(strategy.patch_sampling, dataset, max_sample_bytes)
        self.max_sample_bytes = max_sample_bytes
        self.indexing: Indexing = self.sampler if self.sampler is not None else compile_indexing(strategy)
        self.extractor: Extractor | None = (
            compile_extractor(spec.extractor, dataset, "spec.extractor", max_sample_bytes)
            if spec.HasField("extractor")
            else None
        )
        self.transform: Transform | None = (
            compile_transform(spec.transform, "spec.transform", max_sample_bytes)
            if spec.HasField("transform")
            else None
        )
        self.costly = self.transform is not None and augments(spec.transform)
        """Whether building a sample costs enough (random transforms) to spread a message's samples over threads."""
        self.deterministic = self.sampler is None and not self.costly
        """Whether sample ``i`` is the same in every epoch, for every seed and client (no random patches or
        transforms): what the server may keep compressed (:mod:`patchwire.service._packed_samples`)."""
        self.digest = hashlib.blake2b(spec.SerializeToString(deterministic=True), digest_size=16).digest()
        """The spec's digest: which datasource of its dataset this is, in cache keys."""
        self.private = self.transform is not None and writes_in_place(spec.transform)
        """Whether samples need arrays of their own: only a transform that writes into them does (a sample that is
        only encoded, or only permuted or reshaped, may view the cached blocks)."""
        subset: set[str] | None = None
        if spec.HasField("subject_subset"):
            subset = set(spec.subject_subset.values)
            unknown = sorted(subset - set(dataset.subjects))
            if unknown:
                raise NotFound(
                    f"spec.subject_subset: unknown subjects {bounded_list(unknown)} in dataset "
                    f"{dataset.name!r} (subjects: {bounded_list(dataset.subjects, quote=False)})"
                )
        shapes = dataset.require_image_shapes()
        self.subject_indices: list[int] = []
        self.starts: list[int] = []
        self.counts: list[int] = []
        total = 0
        for s, name in enumerate(dataset.subjects):
            if subset is not None and name not in subset:
                continue
            self.indexing.validate(shapes[s], f"subject {s} ({name!r})")
            if self.sampler is not None:
                self.sampler.check_subject(s, f"subject {s} ({name!r})")
            count = self.indexing.count(shapes[s])
            self.subject_indices.append(s)
            self.starts.append(total)
            self.counts.append(count)
            total += count
        self.length = total

    def subject_of(self, sample_index: int, field: str = "sample_indices") -> tuple[int, int]:
        """(subject index, the sample's number among its subject's) of a sample; negative indices count from the
        end, as in pymia; OutOfRange past either end."""
        i = sample_index + self.length if sample_index < 0 else sample_index
        if not 0 <= i < self.length:
            raise OutOfRange(
                f"{field}: sample index {sample_index} is out of range for a datasource of {self.length} samples"
            )
        pos = bisect.bisect_right(self.starts, i) - 1
        return self.subject_indices[pos], i - self.starts[pos]

    def locate(self, sample_index: int, field: str = "sample_indices") -> tuple[int, Expression]:
        """(subject index, index expression) of a sample; negative indices count from the end, as in pymia.
        InvalidArgument for sampled patches, which have no fixed place (assembly cannot use them)."""
        s, k = self.subject_of(sample_index, field)
        return s, self.indexing.expression(self.dataset.require_image_shapes()[s], k)

    def sample(self, sample_index: int, draw: Draw | None = None) -> dict[str, Any]:
        """pymia's ``datasource[i]`` without the ``sample_index`` key (the client adds it after its transforms);
        ``draw``: the sample's randomness (default: that of its index, seed 0, epoch 0)."""
        if self.extractor is None:
            raise InvalidArgument("spec.extractor: samples need an extractor (pymia fails the same way without one)")
        position = sample_index + self.length if sample_index < 0 else sample_index  # seeds as ds[n - k] would
        if draw is None:
            draw = Draw.of_index(position)
        if self.sampler is None:
            s, expr = self.locate(sample_index)
            params = Params(s, expr, position, self.private)
        else:  # a window drawn from the sample's index, zero-padded where it reaches past the volume
            s, _ = self.subject_of(sample_index)
            params = Params(s, self.sampler.window(s, draw), position, self.private, True, self.max_sample_bytes)
        extracted: dict[str, Any] = {}
        # unless a transform writes into the sample, cached blocks can be read in place
        self.extractor.extract(self.dataset, params, extracted)
        if self.transform is not None:
            extracted = self.transform(extracted, draw)
        return extracted


def direct_extract(
    dataset: Dataset, msg: spec_pb2.DirectExtraction, max_sample_bytes: int | None = None
) -> dict[str, Any]:
    if not msg.HasField("extractor"):
        raise InvalidArgument("extraction.extractor: direct extraction needs an extractor")
    extractor = compile_extractor(msg.extractor, dataset, "extraction.extractor", max_sample_bytes)
    transform = (
        compile_transform(msg.transform, "extraction.transform", max_sample_bytes)
        if msg.HasField("transform")
        else None
    )
    s = dataset.check_subject(int(msg.subject_index), "extraction.subject_index")
    expr: Expression = slice(None)
    if msg.HasField("index_expression"):
        try:
            expr = expression_from_proto(msg.index_expression, "extraction.index_expression")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    extracted: dict[str, Any] = {}
    try:
        extractor.extract(dataset, Params(s, expr, None), extracted)
    except OutOfRange as exc:
        raise OutOfRange(f"extraction.index_expression: {exc}") from exc
    return transform(extracted) if transform is not None else extracted


class DatasourceCache:
    """Compiled datasources keyed by their serialised spec (bounded LRU): specs are compiled once, not per call.

    A compiled datasource belongs to one version of its dataset's file: when the file changes, those of the old
    version are forgotten and the next call compiles its spec against the new one (subjects, shapes and entry names
    may differ)."""

    def __init__(self, datasets: Mapping[str, ServedDataset], capacity: int = 64, limits: Limits | None = None) -> None:
        self._datasets = datasets
        self.limits = limits if limits is not None else Limits()
        self._capacity = capacity
        self._items: OrderedDict[bytes, CompiledDatasource] = OrderedDict()
        self._lock = threading.Lock()
        for served in datasets.values():
            served.listeners.append(self._forget)

    def _forget(self, served: ServedDataset, retired: Dataset | None) -> None:
        with self._lock:
            for key in [k for k, src in self._items.items() if src.dataset.name == served.name]:
                del self._items[key]

    def dataset(self, name: str, field: str = "dataset") -> Dataset:
        """The version of dataset ``name`` to serve a call from: NotFound for a name the server does not know,
        FailedPrecondition with the reason for a dataset it cannot serve."""
        try:
            served = self._datasets[name]
        except KeyError:
            known = ", ".join(sorted(self._datasets)) or "none"
            raise NotFound(f"{field}: unknown dataset {bounded(name)} (served: {known})") from None
        return served.current()

    def consistent(self, version: Dataset, build: Callable[[], T]) -> T:
        """``build()``, with the dataset's file checked before and after it: FailedPrecondition instead of a result
        read from a file that changed (or from a retired version), and instead of an error that the change caused."""
        served = self._datasets[version.name]
        served.confirm(version)
        try:
            result = build()
        except Exception:
            served.confirm(version)
            raise
        served.confirm(version)
        return result

    def get(self, spec: spec_pb2.DatasourceSpec) -> CompiledDatasource:
        dataset = self.dataset(spec.dataset, "spec.dataset")
        key = spec.SerializeToString(deterministic=True)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit.dataset is dataset:
                self._items.move_to_end(key)
                return hit
        check_spec(spec, self.limits)  # before anything is compiled: depth, repeated fields, target shapes
        compiled = CompiledDatasource(dataset, spec, self.limits.max_sample_bytes)
        with self._lock:
            self._items[key] = compiled
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return compiled
