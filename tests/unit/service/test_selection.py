"""The server's selection strategies, compiled from their specs: each against pymia's on hand-made samples where
pymia's works, against hand-computed answers where it fails (NonConstantSelection's loop_axis, empty samples), and
the scan over a datasource (no server)."""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from patchwire.client import extraction as extr
from patchwire.service._catalog import Dataset
from patchwire.service._datasource import CompiledDatasource
from patchwire.service._errors import InvalidArgument, ResourceExhausted
from patchwire.service._extraction import MAX_NESTING
from patchwire.service._limits import Limits
from patchwire.service._selection import SAMPLES_PER_STEP, SelectionScan, compile_selection
from patchwire.v1 import spec_pb2

from _pymia_oracle import load_pymia

pm = load_pymia()
SUBJECTS = ["Subject_1", "Subject_2", "Subject_3"]
FAKE = cast(Dataset, types.SimpleNamespace(name="fake", subjects=SUBJECTS))
"""What compiling needs of a dataset: its subject names."""


def S(**kind: Any) -> spec_pb2.Selection:
    return spec_pb2.Selection(**kind)


def compose(*strategies: spec_pb2.Selection) -> spec_pb2.Selection:
    return S(compose=spec_pb2.ComposeSelection(strategies=strategies))


def accepts(msg: spec_pb2.Selection, sample: dict[str, Any]) -> bool:
    selection = compile_selection(msg, FAKE)
    assert selection.subjects is None
    return selection.accepts(sample, 0)


def samples() -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    noise = rng.normal(10, 3, (6, 5, 2)).astype(np.float32)
    background = np.zeros((6, 5, 2), np.float32)
    background[2:4, 1:3] = 7.5
    return [
        {"images": noise, "labels": rng.integers(0, 3, (6, 5, 1)).astype(np.uint8)},
        {"images": background, "labels": np.zeros((6, 5, 1), np.uint8)},
        {"images": np.full((6, 5, 2), -1.0, np.float32), "labels": np.ones((6, 5, 1), np.int16)},
        {"images": np.arange(60, dtype=np.int32).reshape(6, 5, 2) - 30, "labels": np.eye(6, 5)[..., None] > 0},
        {"images": np.full((3, 3, 2), np.nan, np.float64), "labels": np.full((3, 3, 1), np.nan)},
    ]


PYMIA_CASES = [
    ("non-black", S(non_black=spec_pb2.NonBlackSelection()), lambda: pm.extraction.NonBlackSelection()),
    (
        "non-black-7",
        S(non_black=spec_pb2.NonBlackSelection(black_value=7.25)),
        lambda: pm.extraction.NonBlackSelection(7.25),
    ),
    (
        "non-black-negative",
        S(non_black=spec_pb2.NonBlackSelection(black_value=-2)),
        lambda: pm.extraction.NonBlackSelection(-2),
    ),
    ("non-constant", S(non_constant=spec_pb2.NonConstantSelection()), lambda: pm.extraction.NonConstantSelection()),
    ("foreground", S(with_foreground=spec_pb2.WithForegroundSelection()), pm.extraction.WithForegroundSelection),
    ("percentile-0", S(percentile=spec_pb2.PercentileSelection()), lambda: pm.extraction.PercentileSelection(0)),
    (
        "percentile-50",
        S(percentile=spec_pb2.PercentileSelection(percentile=50)),
        lambda: pm.extraction.PercentileSelection(50),
    ),
    (
        "percentile-85",
        S(percentile=spec_pb2.PercentileSelection(percentile=85)),
        lambda: pm.extraction.PercentileSelection(85),
    ),
    (
        "compose",
        compose(S(non_black=spec_pb2.NonBlackSelection(black_value=5)), S(with_foreground={})),
        lambda: pm.extraction.ComposeSelection(
            [pm.extraction.NonBlackSelection(5), pm.extraction.WithForegroundSelection()]
        ),
    ),
    ("compose-empty", compose(), lambda: pm.extraction.ComposeSelection([])),
]


@pytest.mark.parametrize(("name", "msg", "make"), PYMIA_CASES, ids=[c[0] for c in PYMIA_CASES])
def test_strategy_equals_pymias(name: str, msg: spec_pb2.Selection, make: Any) -> None:
    strategy = make()
    answers = [accepts(msg, s) for s in samples()]
    assert answers == [bool(strategy(s)) for s in samples()]
    assert all(type(a) is bool for a in answers)


def test_the_cases_are_not_trivial() -> None:
    """Each of pymia's cases above accepts some hand-made sample and rejects another (so the comparison means
    something), except the empty ComposeSelection, which accepts every sample."""
    for name, msg, _ in PYMIA_CASES:
        answers = {accepts(msg, s) for s in samples()}
        assert answers == ({True} if name == "compose-empty" else {True, False}), name


def test_percentile_holds_when_enough_values_equal_the_minimum() -> None:
    """The documented meaning: PercentileSelection(p) holds for n values exactly when at least
    ceil((n - 1) p / 100) + 1 of them equal the minimum."""
    for zeros in range(11):
        images = np.concatenate([np.zeros(zeros), np.arange(1, 11 - zeros)]).astype(np.float32)
        for p in (0, 5, 10, 20, 25, 50, 90, 100):
            msg = S(percentile=spec_pb2.PercentileSelection(percentile=p))
            at_minimum = max(zeros, 1)
            expected = at_minimum >= int(np.ceil(9 * p / 100)) + 1
            assert accepts(msg, {"images": images}) is expected, (zeros, p)
            assert bool(pm.extraction.PercentileSelection(p)({"images": images})) is expected


def test_non_constant_along_loop_axis() -> None:
    """Any slice along loop_axis not constant (pymia's intent; its loop fails with an IndexError)."""
    per_channel = np.stack([np.full((4, 3), 1.0), np.full((4, 3), 2.0)], axis=-1)  # each channel constant
    one_varies = per_channel.copy()
    one_varies[2, 1, 1] = 5.0
    rows = np.repeat(np.arange(4.0)[:, None], 3, axis=1)[..., None]  # each row (axis 0) constant

    def non_constant(images: np.ndarray, axis: int | None) -> bool:
        kind = spec_pb2.NonConstantSelection() if axis is None else spec_pb2.NonConstantSelection(loop_axis=axis)
        return accepts(S(non_constant=kind), {"images": images})

    assert non_constant(per_channel, None) is True
    assert non_constant(per_channel, -1) is False and non_constant(per_channel, 2) is False
    assert non_constant(one_varies, -1) is True
    assert non_constant(rows, 0) is False and non_constant(rows, -3) is False
    assert non_constant(rows, 1) is True
    assert non_constant(np.arange(5), 0) is False  # slices of a 1-D array are single values
    with pytest.raises(IndexError):  # what pymia does with any loop_axis
        pm.extraction.NonConstantSelection(loop_axis=-1)({"images": per_channel})


def test_nan_is_never_constant_as_in_pymia() -> None:
    images = np.full((2, 2), np.nan)
    assert accepts(S(non_constant={}), {"images": images}) is bool(
        pm.extraction.NonConstantSelection()({"images": images})
    )
    assert accepts(S(non_constant=spec_pb2.NonConstantSelection(loop_axis=0)), {"images": images}) is True


@pytest.mark.parametrize(
    "msg",
    [
        S(non_black={}),
        S(non_constant={}),
        S(non_constant=spec_pb2.NonConstantSelection(loop_axis=1)),
        S(percentile=spec_pb2.PercentileSelection(percentile=10)),
        S(with_foreground={}),
    ],
    ids=["non-black", "non-constant", "non-constant-axis", "percentile", "foreground"],
)
def test_an_empty_sample_is_not_selected(msg: spec_pb2.Selection) -> None:
    empty = {"images": np.zeros((0, 4, 2), np.float32), "labels": np.zeros((0, 4, 1), np.uint8)}
    assert accepts(msg, empty) is False


def test_boolean_images() -> None:
    images = np.zeros((4, 4), bool)
    images[0, :3] = True
    assert accepts(S(non_black={}), {"images": images}) is True
    assert accepts(S(percentile=spec_pb2.PercentileSelection(percentile=50)), {"images": images}) is True
    assert accepts(S(percentile=spec_pb2.PercentileSelection(percentile=90)), {"images": images}) is False


def test_subject_selection_needs_no_sample() -> None:
    msg = S(subject=spec_pb2.SubjectSelection(subjects=["Subject_2", "elsewhere"], subject_indices=[2, 40]))
    selection = compile_selection(msg, FAKE)
    assert selection.subjects == {1, 2} and not selection.needs_samples
    assert [selection.accepts_subject(s) for s in range(3)] == [False, True, True]
    nothing = compile_selection(S(subject=spec_pb2.SubjectSelection()), FAKE)
    assert nothing.subjects == frozenset()


def test_compose_intersects_subjects_and_orders_tests_cheapest_first() -> None:
    msg = compose(
        S(percentile=spec_pb2.PercentileSelection(percentile=10)),
        S(subject=spec_pb2.SubjectSelection(subjects=["Subject_1", "Subject_2"])),
        compose(S(non_constant={}), S(subject=spec_pb2.SubjectSelection(subject_indices=[1, 2]))),
        S(with_foreground={}),
        S(non_black={}),
    )
    selection = compile_selection(msg, FAKE)
    assert selection.subjects == {1}
    assert [t.field.rsplit(".", 1)[-1] for t in selection.tests] == [
        "with_foreground",
        "non_black",
        "non_constant",
        "percentile",
    ]
    assert selection.tests[2].field == "selection.compose.strategies[2].compose.strategies[0].non_constant"


def test_a_missing_entry_is_reported_whatever_rejects_first() -> None:
    msg = compose(S(non_black=spec_pb2.NonBlackSelection(black_value=1e9)), S(with_foreground={}))
    with pytest.raises(InvalidArgument) as info:
        accepts(msg, {"images": np.zeros((2, 2), np.float32), "subject": "s"})
    text = str(info.value)
    assert text.startswith("selection.compose.strategies[1].with_foreground: sample 0 has no entry 'labels'")
    assert "images, subject" in text


@pytest.mark.parametrize(
    "value", [["a", "b"], np.array(["a", "b"]), "text", None], ids=["list", "str-array", "str", "none"]
)
def test_an_entry_that_is_no_numeric_array_is_refused(value: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"^selection\.non_black: entry 'images' of sample 0 is .*numeric"):
        accepts(S(non_black={}), {"images": value})


@pytest.mark.parametrize(
    ("msg", "pattern"),
    [
        (S(), r"^selection: no strategy is set"),
        (compose(S(non_black={}), S()), r"^selection\.compose\.strategies\[1\]: no strategy is set"),
        (S(percentile=spec_pb2.PercentileSelection(percentile=100.5)), r"^selection\.percentile\.percentile: .*100\.5"),
        (S(percentile=spec_pb2.PercentileSelection(percentile=-1)), r"^selection\.percentile\.percentile"),
        (S(percentile=spec_pb2.PercentileSelection(percentile=float("nan"))), r"\[0, 100\], got nan"),
        (
            S(subject=spec_pb2.SubjectSelection(subject_indices=[0, -1])),
            r"^selection\.subject\.subject_indices: .*-1",
        ),
    ],
    ids=["none", "none-inside", "percentile-high", "percentile-low", "percentile-nan", "negative-subject"],
)
def test_bad_specs_are_invalid(msg: spec_pb2.Selection, pattern: str) -> None:
    with pytest.raises(InvalidArgument, match=pattern):
        compile_selection(msg, FAKE)


def test_loop_axis_beyond_the_sample_is_invalid() -> None:
    msg = compose(S(non_constant=spec_pb2.NonConstantSelection(loop_axis=3)))
    with pytest.raises(InvalidArgument, match=r"^selection\.compose\.strategies\[0\]\.non_constant\.loop_axis: axis 3"):
        accepts(msg, {"images": np.zeros((2, 2, 2))})


def _nested(depth: int) -> spec_pb2.Selection:
    msg = S(non_black={})
    for _ in range(depth):
        msg = compose(msg)
    return msg


def test_nesting_is_bounded() -> None:
    limits = Limits(max_spec_depth=4)
    compile_selection(_nested(4), FAKE, limits)
    with pytest.raises(ResourceExhausted, match="--max-spec-depth"):
        compile_selection(_nested(5), FAKE, limits)
    compile_selection(_nested(MAX_NESTING - 1), FAKE, Limits(max_spec_depth=1000))
    with pytest.raises(InvalidArgument, match=f"nested at most {MAX_NESTING} deep"):
        compile_selection(_nested(MAX_NESTING + 1), FAKE, Limits(max_spec_depth=1000))


def test_repeated_fields_are_bounded() -> None:
    limits = Limits(max_repeated=3, max_subjects=2)
    with pytest.raises(ResourceExhausted, match=r"^selection\.compose\.strategies: 4 values.*--max-repeated"):
        compile_selection(compose(*[S(non_black={})] * 4), FAKE, limits)
    many = S(subject=spec_pb2.SubjectSelection(subjects=["a", "b"], subject_indices=[1]))
    with pytest.raises(ResourceExhausted, match=r"^selection\.subject: 3 subjects.*--max-subjects"):
        compile_selection(many, FAKE, limits)


# -- the scan over a datasource -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tiny_h5: Path) -> Iterator[Dataset]:
    ds = Dataset("tiny", tiny_h5)
    try:
        yield ds
    finally:
        ds.close()


def _source(dataset: Dataset, extractor: Any = None, subset: list[str] | None = None) -> CompiledDatasource:
    spec = spec_pb2.DatasourceSpec(dataset="tiny", indexing_strategy=extr.SliceIndexing(0)._to_proto())
    if extractor is not None:
        spec.extractor.CopyFrom(extractor._to_proto())
    if subset is not None:
        spec.subject_subset.values.extend(subset)
    return CompiledDatasource(dataset, spec)


def _scan_all(scan: SelectionScan, most: int) -> tuple[list[int], int, int]:
    out, built, steps = [], 0, 0
    while not scan.done:
        indices, n = scan.step(most)
        assert len(indices) <= most and n <= SAMPLES_PER_STEP
        out += indices
        built += n
        steps += 1
    return out, built, steps


def test_a_subject_scan_reads_nothing(dataset: Dataset) -> None:
    src = _source(dataset)  # no extractor at all
    msg = S(subject=spec_pb2.SubjectSelection(subjects=["Subject_3"], subject_indices=[0]))
    out, built, steps = _scan_all(SelectionScan(src, compile_selection(msg, dataset)), 7)
    assert out == [*range(0, 20), *range(40, 60)] and built == 0 and steps == 6


def test_a_scan_equals_evaluating_every_sample(dataset: Dataset) -> None:
    src = _source(dataset, extr.DataExtractor(categories=("images", "labels")))
    msg = compose(
        S(non_black=spec_pb2.NonBlackSelection(black_value=175)),
        S(subject=spec_pb2.SubjectSelection(subjects=["Subject_1", "Subject_2"])),
    )
    selection = compile_selection(msg, dataset)
    expected = [i for i in range(40) if (src.sample(i)["images"] > 175).any()]
    assert 0 < len(expected) < 40
    out, built, _ = _scan_all(SelectionScan(src, selection), 5)
    assert out == expected and built == 40  # Subject_3's samples are never read


def test_a_scan_keeps_global_subject_indices_under_a_subset(dataset: Dataset) -> None:
    src = _source(dataset, subset=["Subject_2", "Subject_3"])
    by_index = S(subject=spec_pb2.SubjectSelection(subject_indices=[2]))
    assert _scan_all(SelectionScan(src, compile_selection(by_index, dataset)), 100)[0] == list(range(20, 40))
    outside = S(subject=spec_pb2.SubjectSelection(subjects=["Subject_1"]))
    scan = SelectionScan(src, compile_selection(outside, dataset))
    assert scan.done and scan.step(10) == ([], 0)


def test_a_scan_stops_when_told(dataset: Dataset) -> None:
    src = _source(dataset, extr.DataExtractor())
    scan = SelectionScan(src, compile_selection(S(non_black={}), dataset))
    stopped = threading.Event()
    assert scan.step(3, stopped) == ([0, 1, 2], 3)
    stopped.set()
    assert scan.step(3, stopped) == ([], 0) and not scan.done
    assert scan.step(100)[0] == list(range(3, 60)) and scan.done


def test_array_criteria_need_an_extractor(dataset: Dataset) -> None:
    msg = compose(S(subject=spec_pb2.SubjectSelection(subject_indices=[1])), S(with_foreground={}))
    with pytest.raises(InvalidArgument, match=r"^spec\.extractor: selection\.compose\.strategies\[1\]"):
        SelectionScan(_source(dataset), compile_selection(msg, dataset))
