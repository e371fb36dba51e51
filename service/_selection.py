"""pymia's selection strategies, compiled from their protobuf specs and evaluated on the server.

A :class:`CompiledSelection` is pymia's ``strategy(sample) -> bool`` over a sample as the datasource gives it (after
extraction and transform), split in two: the criteria on a sample's subject, which the server answers from its own
indexing without reading anything, and the criteria on the sample's arrays. :class:`SelectionScan` walks a
datasource in ascending sample order like pymia's ``select_indices`` and extracts only the samples of subjects that
pass the subject criteria (none at all when those are the only criteria).

Meanings, pymia 0.3.4's unless said otherwise:

- ``NonBlackSelection(black_value)``: any value of ``images`` is above ``black_value``.
- ``NonConstantSelection(loop_axis)``: ``images`` is not constant (NaN counts as different from everything, as in
  pymia). With ``loop_axis``, any slice along that axis is not constant; pymia fails there (it indexes with a list,
  an IndexError), so this is the meaning its code intends. A negative axis counts from the end; an axis the sample
  does not have is INVALID_ARGUMENT.
- ``PercentileSelection(percentile)``: every value of ``images`` is at least the sample's own ``percentile``-th
  percentile (numpy's linear interpolation, over all channels together), exactly pymia's formula. Its name
  misleads: since no value is below the minimum, it holds exactly when that percentile *equals* the minimum, i.e.
  when at least ``ceil((n - 1) * percentile / 100) + 1`` of the sample's ``n`` values equal its minimum. It selects
  mostly-background samples, not bright ones, and is rarely true on noisy images. ``percentile`` must lie in
  [0, 100] (pymia fails at the first sample otherwise). Boolean images count as 0 and 1 (pymia fails on them).
- ``WithForegroundSelection()``: any value of ``labels`` is non-zero.
- ``SubjectSelection(subjects)``: the sample's subject is named in ``subjects`` or its (global, file-order) subject
  index is in ``subject_indices``. pymia reads both from the sample and needs a SubjectExtractor; the server knows
  them without one. As in pymia, names the dataset does not have and indices past its last subject match nothing
  (a list of subjects may span several files); a negative index is INVALID_ARGUMENT.
- ``ComposeSelection(strategies)``: every strategy holds (none: every sample). Subject criteria are answered first,
  then the array criteria, cheapest first; the result is pymia's because each criterion is a pure function.

Where pymia fails on an empty sample (NonConstant, Percentile: IndexError), an empty sample is not selected. A
criterion whose entry the sample lacks (``labels`` not extracted for WithForegroundSelection) or holds as something
other than a numeric array is INVALID_ARGUMENT naming the criterion's field, whichever criteria came before it (pymia
fails only when an earlier criterion of a ComposeSelection did not already reject the sample).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchwire.service._catalog import Dataset
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._errors import InvalidArgument, bounded_list
from patchwire.service._extraction import short_field, spec_choice
from patchwire.service._limits import Limits, exhausted
from patchwire.service._randomness import Draw
from patchwire.v1 import spec_pb2
from patchwire.wire import definition as defs

__all__ = [
    "MAX_INDICES_PER_MESSAGE",
    "SAMPLES_PER_STEP",
    "CompiledSelection",
    "SelectionScan",
    "compile_selection",
]

MAX_INDICES_PER_MESSAGE = 1 << 16
"""Most indices in one SelectIndicesResponse (at most 10 bytes each on the wire: well under a message's limit)."""
SAMPLES_PER_STEP = 256
"""Most samples one step of a scan extracts (a step runs in the executor, with the file checked around it)."""

Sample = Mapping[str, Any]


@dataclass(frozen=True)
class _Test:
    """One criterion on a sample's arrays: ``fn(array)`` of entry ``key``; ``field``: its path in the request."""

    key: str
    fn: Callable[[np.ndarray], bool]
    field: str
    cost: int
    """Relative cost per value (tests run cheapest first)."""


@dataclass(frozen=True)
class CompiledSelection:
    """A selection strategy: subject criteria (answered without a sample) and tests on the sample's arrays."""

    subjects: frozenset[int] | None
    """Global indices of the subjects whose samples may be selected; None: every subject."""
    tests: tuple[_Test, ...] = ()
    """Criteria on the sample's arrays, cheapest first; all must hold."""

    def accepts_subject(self, subject_index: int) -> bool:
        return self.subjects is None or subject_index in self.subjects

    @property
    def needs_samples(self) -> bool:
        """Whether samples must be extracted (False: the subject criteria decide alone)."""
        return bool(self.tests)

    def accepts(self, sample: Sample, sample_index: int) -> bool:
        """Whether the array criteria hold for ``sample`` (sample ``sample_index``, named in errors); every entry a
        criterion needs is checked first, so the error does not depend on which criterion rejected the sample."""
        arrays = {t.key: _array(sample, t.key, t.field, sample_index) for t in self.tests}
        for t in self.tests:
            try:
                if not t.fn(arrays[t.key]):
                    return False
            except InvalidArgument:
                raise
            except (ValueError, TypeError, IndexError, np.exceptions.AxisError) as exc:
                raise InvalidArgument(f"{t.field}: {exc} (sample {sample_index})") from exc
        return True


def compile_selection(
    msg: spec_pb2.Selection, dataset: Dataset, limits: Limits | None = None, field: str = "selection"
) -> CompiledSelection:
    """Compiles a selection spec against ``dataset`` (subject names resolve to its indices). Bounded like the other
    specs: ComposeSelections nested beyond ``limits.max_spec_depth`` (RESOURCE_EXHAUSTED) or MAX_NESTING
    (INVALID_ARGUMENT), more than ``max_repeated`` strategies in one, or more than ``max_subjects`` subjects in a
    SubjectSelection are refused before anything is read."""
    limits = limits if limits is not None else Limits()
    subjects: frozenset[int] | None = None
    tests: list[_Test] = []
    for criterion in _criteria(msg, dataset, limits, field, 1):
        if isinstance(criterion, frozenset):
            subjects = criterion if subjects is None else subjects & criterion
        else:
            tests.append(criterion)
    return CompiledSelection(subjects, tuple(sorted(tests, key=lambda t: t.cost)))


def _criteria(
    msg: spec_pb2.Selection, dataset: Dataset, limits: Limits, field: str, depth: int
) -> list[frozenset[int] | _Test]:
    """The criteria ``msg`` ANDs together (a ComposeSelection's, flattened): sets of accepted subjects and tests."""
    kind, sub, where = spec_choice(msg, "strategy", field, depth, "ComposeSelection")
    if kind == "compose":
        if depth > limits.max_spec_depth:
            raise exhausted(
                f"{short_field(where)}: specs nested too deep", limits.max_spec_depth, "--max-spec-depth", " levels"
            )
        if len(sub.strategies) > limits.max_repeated:
            raise exhausted(
                f"{where}.strategies: {len(sub.strategies)} values", limits.max_repeated, "--max-repeated", " values"
            )
        out: list[frozenset[int] | _Test] = []
        for i, s in enumerate(sub.strategies):
            out.extend(_criteria(s, dataset, limits, f"{where}.strategies[{i}]", depth + 1))
        return out
    if kind == "subject":
        return [_subjects(sub, dataset, limits, where)]
    if kind == "non_black":
        black = float(sub.black_value)
        return [_Test(defs.KEY_IMAGES, lambda a: bool((a > black).any()), where, 1)]
    if kind == "with_foreground":
        return [_Test(defs.KEY_LABELS, lambda a: bool(a.any()), where, 0)]
    if kind == "non_constant":
        axis = int(sub.loop_axis) if sub.HasField("loop_axis") else None
        return [_Test(defs.KEY_IMAGES, lambda a: _non_constant(a, axis, f"{where}.loop_axis"), where, 2)]
    if kind == "percentile":
        p = float(sub.percentile)
        if not 0.0 <= p <= 100.0:  # (NaN too)
            raise InvalidArgument(f"{where}.percentile: must lie in [0, 100], got {p}")
        return [_Test(defs.KEY_IMAGES, lambda a: _percentile(a, p), where, 3)]
    raise InvalidArgument(f"{field}: unknown strategy {kind!r}")


def _subjects(sub: spec_pb2.SubjectSelection, dataset: Dataset, limits: Limits, where: str) -> frozenset[int]:
    count = len(sub.subjects) + len(sub.subject_indices)
    if count > limits.max_subjects:
        raise exhausted(f"{where}: {count} subjects", limits.max_subjects, "--max-subjects", " values")
    negative = [int(i) for i in sub.subject_indices if i < 0]
    if negative:
        raise InvalidArgument(
            f"{where}.subject_indices: subject indices count from 0 in file order, got {bounded_list(negative)}"
        )
    names = set(sub.subjects)
    indices = {int(i) for i in sub.subject_indices}
    return frozenset(s for s, name in enumerate(dataset.subjects) if name in names or s in indices)


def _array(sample: Sample, key: str, where: str, sample_index: int) -> np.ndarray:
    """Entry ``key`` of a sample as a numeric (or boolean) array, or INVALID_ARGUMENT naming the criterion."""
    if key not in sample:
        have = bounded_list(sorted(sample), 8, quote=False) or "none"
        raise InvalidArgument(
            f"{short_field(where)}: sample {sample_index} has no entry {key!r} (its entries: {have}); the datasource's "
            f"extractor must extract {key!r}"
        )
    value = sample[key]
    if isinstance(value, np.ndarray | np.generic) and (
        np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
    ):
        return np.asarray(value)
    what = f"an array of {value.dtype}" if isinstance(value, np.ndarray | np.generic) else type(value).__name__
    raise InvalidArgument(
        f"{short_field(where)}: entry {key!r} of sample {sample_index} is {what}, not a numeric array"
    )


def _non_constant(a: np.ndarray, axis: int | None, where: str) -> bool:
    if axis is None:
        return a.size > 0 and bool((a != a.flat[0]).any())
    if not -a.ndim <= axis < a.ndim:
        raise InvalidArgument(f"{where}: axis {axis} is out of bounds for the {a.ndim}-D entry {defs.KEY_IMAGES!r}")
    if a.size == 0:
        return False
    rows = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)  # one row per slice, in the slice's own C order
    return bool((rows != rows[:, :1]).any())


def _percentile(a: np.ndarray, p: float) -> bool:
    if a.size == 0:
        return False
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    return bool((a >= np.percentile(a, p)).all())


class SelectionScan:
    """The accepted sample indices of a datasource in ascending order, produced in steps (pymia's
    ``select_indices``): samples are evaluated with the randomness of their index, ``Draw.of_index(i, seed,
    epoch)``; subjects the subject criteria reject are skipped unread, and without array criteria nothing is read."""

    def __init__(self, src: CompiledDatasource, selection: CompiledSelection, seed: int = 0, epoch: int = 0) -> None:
        self.src = src
        self.selection = selection
        self.seed = int(seed)
        self.epoch = int(epoch)
        self._ranges = [
            (start, start + count)
            for s, start, count in zip(src.subject_indices, src.starts, src.counts, strict=True)
            if count and selection.accepts_subject(s)
        ]
        self._range = 0  # the range being walked
        self._next = self._ranges[0][0] if self._ranges else 0  # the next sample index in it
        if self._ranges and selection.needs_samples and src.extractor is None:
            test = selection.tests[0]
            raise InvalidArgument(
                f"spec.extractor: {short_field(test.field)} tests each sample's {test.key!r}, and samples need an "
                "extractor"
            )

    @property
    def done(self) -> bool:
        """Whether every sample has been evaluated."""
        return self._range >= len(self._ranges)

    def step(self, most: int, stopped: threading.Event | None = None) -> tuple[list[int], int]:
        """(accepted indices, samples extracted) of the next step: at most ``most`` indices, from at most
        SAMPLES_PER_STEP samples when samples are read; returns early once ``stopped`` is set."""
        out: list[int] = []
        built = 0
        while not self.done and len(out) < most and not (stopped is not None and stopped.is_set()):
            stop = self._ranges[self._range][1]
            i = self._next
            if not self.selection.needs_samples:  # the fast path: whole runs of indices, nothing read
                i = min(stop, i + most - len(out))
                out.extend(range(self._next, i))
            elif built == SAMPLES_PER_STEP:
                break
            else:
                sample = self.src.sample(i, Draw.of_index(i, self.seed, self.epoch))
                built += 1
                if self.selection.accepts(sample, i):
                    out.append(i)
                i += 1
            if i < stop:
                self._next = i
            else:
                self._range += 1
                if not self.done:
                    self._next = self._ranges[self._range][0]
        return out, built
