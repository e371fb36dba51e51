"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st


def _item(draw: st.DrawFn, dim: int, negative: bool) -> int | slice:
    low = -dim if negative else 0
    if draw(st.booleans()):
        return draw(st.integers(low, dim - 1))
    start = draw(st.one_of(st.none(), st.integers(low - 2 * negative, dim + 3)))
    stop = draw(st.one_of(st.none(), st.integers(low - 2 * negative, dim + 5)))
    return slice(start, stop)


@st.composite
def index_expressions(draw: st.DrawFn, shape: Sequence[int], negative: bool = False) -> tuple[int | slice, ...]:
    """An h5py index expression for an array of ``shape``: one to ``len(shape)`` axes, each an index or a slice whose
    bounds may run past the axis (``negative``: indices and bounds counted from the end too)."""
    n = draw(st.integers(1, len(shape)))
    return tuple(_item(draw, shape[a], negative) for a in range(n))
