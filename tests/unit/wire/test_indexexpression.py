"""pymia's IndexExpression and its wire form (checked against pymia's own class)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given

from patchwire.v1 import values_pb2
from patchwire.wire.errors import WireError
from patchwire.wire.indexexpression import WHOLE, IndexExpression, expression_from_proto, expression_to_proto

from _pymia_oracle import load_pymia
from _strategies import index_expressions


@given(index_expressions((5, 6, 7), negative=True))
def test_expressions_round_trip(expr: Any) -> None:
    assert expression_from_proto(expression_to_proto(expr)) == expr
    assert IndexExpression.from_proto(IndexExpression.of(expr).to_proto()) == IndexExpression.of(expr)


def test_whole() -> None:
    assert expression_to_proto(WHOLE).whole
    assert IndexExpression().expression == WHOLE
    assert IndexExpression.from_proto(values_pb2.IndexExpression(whole=True)) == IndexExpression()


@pytest.mark.parametrize(
    ("indexing", "axis"),
    [(None, None), (3, None), ((2, 5), None), ([1, (0, 4)], None), (7, 2), ([(1, 3), 4], (0, 2))],
)
def test_constructed_as_pymia_constructs_it(indexing: Any, axis: Any) -> None:
    load_pymia()
    import pymia.data.indexexpression

    theirs = pymia.data.indexexpression.IndexExpression(indexing, axis)
    ours = IndexExpression(indexing, axis)
    assert ours.expression == theirs.expression
    if theirs.expression != WHOLE:
        assert ours.get_indexing() == theirs.get_indexing()


def test_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError, match="slice steps"):
        expression_to_proto((slice(0, 4, 2),))
    with pytest.raises(ValueError, match="must be slice"):
        expression_to_proto(slice(1, None))


def test_malformed_wire_forms_name_the_field() -> None:
    msg = values_pb2.IndexExpression(whole=True)
    msg.axes.add(index=1)
    with pytest.raises(WireError, match=r"extraction\.index_expression: an expression is either whole or has axes"):
        expression_from_proto(msg, "extraction.index_expression")
    msg = values_pb2.IndexExpression()
    msg.axes.add()
    with pytest.raises(WireError, match=r"index_expression.axes\[0\]: neither index nor range is set"):
        expression_from_proto(msg)
