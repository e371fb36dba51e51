"""pymia's IndexExpression (``pymia.data.indexexpression``): which part of a subject's array a sample is (defined in
:mod:`patchwire.wire.indexexpression`, with its wire form)."""

from patchwire.wire.indexexpression import IndexExpression

__all__ = ["IndexExpression"]
