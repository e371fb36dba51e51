"""Selection strategies with the names, defaults and meanings of ``pymia.data.extraction.selection``, evaluated by
the server: only the accepted sample indices cross the network, not the samples.

A pymia user changes only how the datasource is built::

    from patchwire.client import selection as sel

    # pymia:      indices = extr.select_indices(pymia_datasource, extr.NonBlackSelection())
    strategy = sel.ComposeSelection([sel.NonBlackSelection(), sel.WithForegroundSelection()])
    indices = sel.select_indices(dataset, strategy)
    sampler = torch.utils.data.SubsetRandomSampler(indices)

The strategies keep pymia's ``strategy(sample) -> bool`` too, with the meanings the server gives them. Where they
differ from pymia 0.3.4:

- :class:`SubjectSelection` needs no ``SubjectExtractor`` on the server, which knows every sample's subject and
  answers without reading a sample (when it is the only criterion, nothing is read at all). It takes names, subject
  indices (global, in file order) or both. Called on a sample here, it reads pymia's ``subject`` and
  ``subject_index`` entries, as pymia does.
- ``NonConstantSelection(loop_axis)`` holds when any slice along ``loop_axis`` is not constant (pymia fails with an
  IndexError for any ``loop_axis``).
- ``PercentileSelection(p)`` is pymia's formula, every value at least the sample's own ``p``-th percentile, whose
  name misleads: it holds exactly when that percentile equals the sample's minimum, i.e. when at least
  ``ceil((n - 1) p / 100) + 1`` of its ``n`` values equal the minimum; it selects mostly-background samples. ``p``
  outside [0, 100] is a ValueError when the strategy is made (pymia fails at the first sample).
- An empty sample is not selected (pymia's NonConstant and Percentile fail on one).
- A criterion whose entry the samples lack (``labels`` for :class:`WithForegroundSelection` without labels
  extracted) is an :class:`~patchwire.client.InvalidArgumentError` naming it, whatever the other criteria of a
  :class:`ComposeSelection` answer; bad parameters are one too.
- :func:`select_indices` takes ``seed`` and ``epoch``: the randomness of the datasource's patch sampling and random
  transforms, each sample drawing from (``seed``, ``epoch``, its index) (pymia has no such randomness).

The server evaluates samples as it makes them: after extraction and the server's part of the transform. So a
strategy of your own (any callable taking a sample, or a :class:`SelectionStrategy` subclass), a ComposeSelection
holding one, a datasource whose transform has client-side callables (``LambdaTransform``), or a datasource that is
not a :class:`~patchwire.client.RemoteDatasource` (pymia's own, say) is evaluated here instead, by pymia's loop over
every sample, with the meanings above; a SubjectSelection alone is always answered by the server.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from patchwire.client import definition as defs
from patchwire.client._datasource import RemoteDatasource
from patchwire.v1 import spec_pb2

__all__ = [
    "ComposeSelection",
    "NonBlackSelection",
    "NonConstantSelection",
    "PercentileSelection",
    "SelectionStrategy",
    "SubjectSelection",
    "WithForegroundSelection",
    "select_indices",
]


class SelectionStrategy:
    """Base of the selection strategies: ``strategy(sample) -> bool`` (pymia's interface), and a spec for the
    server. A subclass of your own implements ``__call__`` only and is evaluated on the client."""

    def __call__(self, sample: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _to_proto(self) -> spec_pb2.Selection:
        raise NotImplementedError(f"{type(self).__name__} is evaluated on the client (it has no server spec)")

    def __repr__(self) -> str:
        return type(self).__name__


class NonBlackSelection(SelectionStrategy):
    """Samples with any ``images`` value above ``black_value``."""

    def __init__(self, black_value: float = 0.0) -> None:
        self.black_value = black_value

    def __call__(self, sample: dict[str, Any]) -> bool:
        return bool((sample[defs.KEY_IMAGES] > self.black_value).any())

    def _to_proto(self) -> spec_pb2.Selection:
        return spec_pb2.Selection(non_black=spec_pb2.NonBlackSelection(black_value=float(self.black_value)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.black_value})"


class NonConstantSelection(SelectionStrategy):
    """Samples whose ``images`` are not constant; with ``loop_axis``, whose slices along it are not all constant."""

    def __init__(self, loop_axis: int | None = None) -> None:
        self.loop_axis = None if loop_axis is None else int(loop_axis)

    def __call__(self, sample: dict[str, Any]) -> bool:
        a = np.asarray(sample[defs.KEY_IMAGES])
        if self.loop_axis is None:
            return a.size > 0 and bool((a != a.flat[0]).any())
        axis = self.loop_axis
        if not -a.ndim <= axis < a.ndim:
            raise ValueError(f"loop_axis {axis} is out of bounds for the {a.ndim}-D entry {defs.KEY_IMAGES!r}")
        if a.size == 0:
            return False
        rows = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)  # one row per slice
        return bool((rows != rows[:, :1]).any())

    def _to_proto(self) -> spec_pb2.Selection:
        return spec_pb2.Selection(non_constant=spec_pb2.NonConstantSelection(loop_axis=self.loop_axis))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.loop_axis})"


class PercentileSelection(SelectionStrategy):
    """Samples whose every ``images`` value is at least their own ``percentile``-th percentile: those with at least
    ``ceil((n - 1) percentile / 100) + 1`` of their ``n`` values at the minimum (see the module's notes)."""

    def __init__(self, percentile: float) -> None:
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
        self.percentile = percentile

    def __call__(self, sample: dict[str, Any]) -> bool:
        a = np.asarray(sample[defs.KEY_IMAGES])
        if a.size == 0:
            return False
        if a.dtype == np.bool_:
            a = a.view(np.uint8)
        return bool((a >= np.percentile(a, self.percentile)).all())

    def _to_proto(self) -> spec_pb2.Selection:
        return spec_pb2.Selection(percentile=spec_pb2.PercentileSelection(percentile=float(self.percentile)))

    def __repr__(self) -> str:
        return f"{type(self).__name__} ({self.percentile})"


class WithForegroundSelection(SelectionStrategy):
    """Samples with any non-zero ``labels`` value."""

    def __call__(self, sample: dict[str, Any]) -> bool:
        return bool(np.asarray(sample[defs.KEY_LABELS]).any())

    def _to_proto(self) -> spec_pb2.Selection:
        return spec_pb2.Selection(with_foreground=spec_pb2.WithForegroundSelection())


class SubjectSelection(SelectionStrategy):
    """Samples of the given subjects: names, subject indices (global, in file order), or a mix; one or many."""

    def __init__(self, subjects: str | int | Iterable[str | int]) -> None:
        self.subjects: tuple[Any, ...] = (
            (subjects,) if isinstance(subjects, str | numbers.Integral) else tuple(subjects)  # type: ignore[arg-type]
        )
        for s in self.subjects:
            if not isinstance(s, str | numbers.Integral):
                raise TypeError(f"subjects are names (str) or subject indices (int), got {s!r}")
        self._names = [s for s in self.subjects if isinstance(s, str)]
        self._indices = [int(s) for s in self.subjects if not isinstance(s, str)]

    def __call__(self, sample: dict[str, Any]) -> bool:
        if defs.KEY_SUBJECT not in sample or defs.KEY_SUBJECT_INDEX not in sample:
            raise KeyError(
                f"SubjectSelection evaluated on the client reads the sample's {defs.KEY_SUBJECT!r} and "
                f"{defs.KEY_SUBJECT_INDEX!r} entries: extract them with a SubjectExtractor"
            )
        return sample[defs.KEY_SUBJECT] in self._names or sample[defs.KEY_SUBJECT_INDEX] in self._indices

    def _to_proto(self) -> spec_pb2.Selection:
        return spec_pb2.Selection(
            subject=spec_pb2.SubjectSelection(subjects=self._names, subject_indices=self._indices)
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__} ({','.join(str(s) for s in self.subjects)})"


class ComposeSelection(SelectionStrategy):
    """Samples every one of ``strategies`` selects (all of them when there are none)."""

    def __init__(self, strategies: Iterable[Any]) -> None:
        self.strategies: list[Any] = list(strategies)
        """Built-in strategies, or any callables taking a sample (evaluated on the client)."""

    def __call__(self, sample: dict[str, Any]) -> bool:
        return all(strategy(sample) for strategy in self.strategies)

    def _to_proto(self) -> spec_pb2.Selection:
        for s in self.strategies:
            if not isinstance(s, SelectionStrategy):
                raise NotImplementedError(f"{s!r} is evaluated on the client (it has no server spec)")
        strategies = [s._to_proto() for s in self.strategies]
        return spec_pb2.Selection(compose=spec_pb2.ComposeSelection(strategies=strategies))

    def __repr__(self) -> str:
        return "|".join(repr(s) for s in self.strategies)


_SERVED = (NonBlackSelection, NonConstantSelection, PercentileSelection, WithForegroundSelection, SubjectSelection)


def _served(strategy: Any) -> bool:
    """Whether the server can evaluate ``strategy``: built-in strategies only (exactly: a subclass may redefine
    ``__call__``)."""
    if type(strategy) is ComposeSelection:
        return all(_served(s) for s in strategy.strategies)
    return type(strategy) in _SERVED


def _subjects_only(strategy: Any) -> bool:
    if type(strategy) is ComposeSelection:
        return all(_subjects_only(s) for s in strategy.strategies)
    return type(strategy) is SubjectSelection


def select_indices(
    data_source: Any, selection_strategy: Callable[[dict[str, Any]], Any], seed: int = 0, epoch: int = 0
) -> list[int]:
    """The indices of the samples of ``data_source`` that ``selection_strategy`` accepts, in ascending order
    (pymia's ``select_indices``). A :class:`~patchwire.client.RemoteDatasource` with built-in strategies is
    evaluated by the server; anything else here, sample by sample (see the module's notes). ``seed`` and ``epoch``:
    the randomness of the datasource's patch sampling and random transforms."""
    if isinstance(data_source, RemoteDatasource) and _served(selection_strategy):
        strategy: SelectionStrategy = selection_strategy  # type: ignore[assignment]
        if not data_source._client_steps or _subjects_only(strategy):
            return data_source.select(strategy._to_proto(), seed, epoch)
    if isinstance(data_source, RemoteDatasource):
        samples = data_source.samples(seed=seed, epoch=epoch)
    else:
        samples = iter(data_source)
    return [i for i, sample in enumerate(samples) if selection_strategy(sample)]
