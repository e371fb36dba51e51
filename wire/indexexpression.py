"""pymia's IndexExpression (``pymia.data.indexexpression``): which part of a subject's array a sample is, and its
form on the wire.

Inside the server an expression is the plain numpy index it wraps (:data:`Expression`); a client sees pymia's class.
Both convert through :func:`expression_to_proto` and :func:`expression_from_proto`.
"""

from __future__ import annotations

from typing import Any, Union

from patchwire.v1 import values_pb2
from patchwire.wire.errors import WireError

__all__ = ["WHOLE", "Expression", "IndexExpression", "expression_from_proto", "expression_to_proto"]

WHOLE = slice(None)
"""The expression of a whole array (pymia's ``IndexExpression()``)."""
Expression = Union[slice, tuple[Union[int, slice], ...]]  # noqa: UP007 (a runtime alias)
"""A numpy index: :data:`WHOLE`, or a tuple of ints and step-less slices."""


def expression_to_proto(expr: Expression) -> values_pb2.IndexExpression:
    """The wire form of an expression; ValueError for a bare slice other than WHOLE or a slice with a step."""
    out = values_pb2.IndexExpression()
    if isinstance(expr, slice):
        if expr != WHOLE:
            raise ValueError(f"a bare expression must be slice(None), got {expr!r}")
        out.whole = True
        return out
    for item in expr:
        axis = out.axes.add()
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise ValueError(f"index expressions take no slice steps, got {item!r}")
            axis.range.SetInParent()
            if item.start is not None:
                axis.range.start = int(item.start)
            if item.stop is not None:
                axis.range.stop = int(item.stop)
        else:
            axis.index = int(item)
    return out


def expression_from_proto(msg: values_pb2.IndexExpression, field: str = "index_expression") -> Expression:
    """An expression from its wire form; WireError naming ``field`` for one that is both whole and has axes, or an
    axis with neither index nor range."""
    if msg.whole:
        if msg.axes:
            raise WireError(f"{field}: an expression is either whole or has axes, not both")
        return WHOLE
    items: list[int | slice] = []
    for i, axis in enumerate(msg.axes):
        kind = axis.WhichOneof("kind")
        if kind == "index":
            items.append(int(axis.index))
        elif kind == "range":
            r = axis.range
            items.append(slice(r.start if r.HasField("start") else None, r.stop if r.HasField("stop") else None))
        else:
            raise WireError(f"{field}.axes[{i}]: neither index nor range is set")
    return tuple(items)


class IndexExpression:
    """pymia's IndexExpression: ``expression`` is a bare ``slice(None)`` (whole array) or a tuple of ints/slices."""

    def __init__(self, indexing: Any = None, axis: int | tuple[int, ...] | None = None) -> None:
        self.expression: Any = None
        self.set_indexing(indexing, axis)

    def set_indexing(self, indexing: Any, axis: int | tuple[int, ...] | None = None) -> None:
        if indexing is None:
            self.expression = slice(None)
            return
        if isinstance(indexing, int | tuple):
            indexing = [indexing]
        if axis is None:
            axis = tuple(range(len(indexing)))
        if isinstance(axis, int):
            axis = (axis,)
        expr: list[Any] = [slice(None)] * (max(axis) + 1)
        for a, index in zip(axis, indexing, strict=False):
            if isinstance(index, int):
                expr[a] = index
            elif isinstance(index, tuple | list):
                start, stop = index
                expr[a] = slice(start, stop)
            elif isinstance(index, slice):
                expr[a] = index
            else:
                raise ValueError(f'Unknown type "{type(index)}" of index')
        self.expression = tuple(expr)

    def get_indexing(self) -> list[Any]:
        out: list[Any] = []
        for index in self.expression:
            if index is None:
                out.append(None)
            elif isinstance(index, slice):
                out.append((index.start, index.stop))
            elif isinstance(index, int):
                out.append(index)
            else:
                raise ValueError("only 'int', 'slice', and 'None' types possible in expression")
        return out

    @classmethod
    def of(cls, expression: Expression) -> IndexExpression:
        """The pymia object of a plain expression."""
        out = cls()
        out.expression = expression
        return out

    def to_proto(self) -> values_pb2.IndexExpression:
        return expression_to_proto(self.expression)

    @classmethod
    def from_proto(cls, msg: values_pb2.IndexExpression) -> IndexExpression:
        return cls.of(expression_from_proto(msg))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexExpression) and self.expression == other.expression

    def __hash__(self) -> int:
        return hash(repr(self.expression))

    def __repr__(self) -> str:
        return f"IndexExpression({self.expression!r})"
