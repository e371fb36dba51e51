"""pymia's IndexExpression (``pymia.data.indexexpression``): which part of a subject's array a sample is."""

from __future__ import annotations

from typing import Any

from patchwire.v1 import values_pb2

__all__ = ["IndexExpression"]


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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexExpression) and self.expression == other.expression

    def __hash__(self) -> int:
        return hash(repr(self.expression))

    def __repr__(self) -> str:
        return f"IndexExpression({self.expression!r})"

    def _to_proto(self) -> values_pb2.IndexExpression:
        out = values_pb2.IndexExpression()
        if isinstance(self.expression, slice):
            if self.expression != slice(None):
                raise ValueError(f"a bare expression must be slice(None), got {self.expression!r}")
            out.whole = True
            return out
        for item in self.expression:
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

    @classmethod
    def _from_proto(cls, msg: values_pb2.IndexExpression) -> IndexExpression:
        out = cls()
        if msg.whole:
            return out
        items: list[Any] = []
        for axis in msg.axes:
            if axis.WhichOneof("kind") == "index":
                items.append(int(axis.index))
            else:
                r = axis.range
                items.append(slice(r.start if r.HasField("start") else None, r.stop if r.HasField("stop") else None))
        out.expression = tuple(items)
        return out
