"""The server's extractors, compiled from their specs, against pymia's reading the same file with its own reader:
the same entries, values, dtypes and shapes for a subject and an index expression (no server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from patchwire.client import extraction as extr
from patchwire.service._catalog import Dataset
from patchwire.service._errors import InvalidArgument, NotFound
from patchwire.service._extraction import MAX_NESTING, Params, compile_extractor
from patchwire.v1 import spec_pb2

from _pymia_oracle import load_pymia

pm = load_pymia()
EXPRESSIONS = [slice(None), (3,), (slice(2, 6), slice(0, 5))]
CASES = [
    ("data", lambda lib: lib.DataExtractor()),
    ("data-categories", lambda lib: lib.DataExtractor(categories=("labels", "mask"))),
    ("selective", lambda lib: lib.SelectiveDataExtractor(selection=("T2",), category="images")),
    ("names", lambda lib: lib.NamesExtractor()),
    ("subject", lambda lib: lib.SubjectExtractor()),
    ("shape", lambda lib: lib.ImagePropertyShapeExtractor()),
    ("shape-numpy", lambda lib: lib.ImagePropertyShapeExtractor(numpy_format=True)),
    ("pad", lambda lib: lib.PadDataExtractor(((1, 2), (0, 3)), lib.DataExtractor(categories=("images",)))),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dataset, Path]]:
    from _datasets import make_pymia_dataset

    path = make_pymia_dataset(tmp_path_factory.mktemp("extraction"))
    ds = Dataset("tiny", path)
    try:
        yield ds, path
    finally:
        ds.close()


def _pymia_extract(path: Path, extractor: Any, subject: int, expr: Any) -> dict[str, Any]:
    extracted: dict[str, Any] = {}
    with pm.extraction.get_reader(str(path)) as reader:
        index_expr = pm.data.indexexpression.IndexExpression()
        index_expr.expression = expr
        extractor.extract(reader, {"subject_index": subject, "index_expr": index_expr}, extracted)
    return extracted


@pytest.mark.parametrize(
    ("name", "make", "expr"),
    [(n, make, e) for n, make in CASES for e in EXPRESSIONS if n != "pad" or (isinstance(e, tuple) and len(e) == 2)],
    ids=lambda v: v if isinstance(v, str) else "" if callable(v) else str(v),
)
def test_extractor_equals_pymias(dataset: tuple[Dataset, Path], name: str, make: Any, expr: Any) -> None:
    ds, path = dataset
    ours: dict[str, Any] = {}
    compile_extractor(make(extr)._to_proto(), ds).extract(ds, Params(1, expr, 0), ours)
    theirs = _pymia_extract(path, make(pm.extraction), 1, expr)
    assert ours.keys() == theirs.keys()
    for key, want in theirs.items():
        got = ours[key]
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.shape == want.shape, key
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            assert got == want, key


def test_unknown_categories_and_entries_are_refused(dataset: tuple[Dataset, Path]) -> None:
    ds, _ = dataset
    with pytest.raises(NotFound, match=r"extractor\.data\.categories"):
        compile_extractor(extr.DataExtractor(categories=("nope",))._to_proto(), ds)
    with pytest.raises(NotFound, match="T9"):
        compile_extractor(extr.SelectiveDataExtractor(selection=("T9",), category="images")._to_proto(), ds)
    with pytest.raises(InvalidArgument, match="extractor: no extractor is set"):
        compile_extractor(spec_pb2.Extractor(), ds)


def test_nesting_is_bounded_before_recursing(dataset: tuple[Dataset, Path]) -> None:
    ds, _ = dataset
    spec = spec_pb2.Extractor(subject=spec_pb2.SubjectExtractor())
    for _ in range(MAX_NESTING + 1):
        spec = spec_pb2.Extractor(compose=spec_pb2.ComposeExtractor(extractors=[spec]))
    with pytest.raises(InvalidArgument, match=f"nested at most {MAX_NESTING} deep"):
        compile_extractor(spec, ds)
