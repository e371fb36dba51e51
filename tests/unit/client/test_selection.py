"""The client's selection strategies: pymia's names, defaults and reprs, the specs they send, and the same answers
as pymia's when called on a sample here (the evaluation of strategies the server cannot run); select_indices over
a datasource that is not served evaluates here, like pymia's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from patchwire.client import selection as sel
from patchwire.v1 import spec_pb2

from _pymia_oracle import load_pymia

pm = load_pymia()


def _samples() -> list[dict[str, Any]]:
    rng = np.random.default_rng(8)
    background = np.zeros((5, 4, 2), np.float32)
    background[1:3, 1] = 4.0
    return [
        {"images": rng.normal(3, 1, (5, 4, 2)), "labels": rng.integers(0, 2, (5, 4, 1)), "subject": "a"},
        {"images": background, "labels": np.zeros((5, 4, 1), np.uint8), "subject": "b"},
        {"images": np.full((5, 4, 2), -2, np.int16), "labels": np.ones((5, 4, 1), bool), "subject": "c"},
    ]


CASES = [
    ("NonBlackSelection", ()),
    ("NonBlackSelection", (3.5,)),
    ("NonConstantSelection", ()),
    ("PercentileSelection", (50,)),
    ("PercentileSelection", (90,)),
    ("WithForegroundSelection", ()),
]


@pytest.mark.parametrize(("name", "args"), CASES, ids=[f"{n}{a}" for n, a in CASES])
def test_strategies_answer_and_print_as_pymias(name: str, args: tuple[Any, ...]) -> None:
    ours, theirs = getattr(sel, name)(*args), getattr(pm.extraction, name)(*args)
    assert [ours(s) for s in _samples()] == [bool(theirs(s)) for s in _samples()]
    assert repr(ours) == repr(theirs)
    compose = sel.ComposeSelection([ours, sel.NonBlackSelection()])
    assert repr(compose) == repr(pm.extraction.ComposeSelection([theirs, pm.extraction.NonBlackSelection()]))


def test_specs() -> None:
    assert sel.NonBlackSelection()._to_proto() == spec_pb2.Selection(non_black=spec_pb2.NonBlackSelection())
    assert not sel.NonConstantSelection()._to_proto().non_constant.HasField("loop_axis")
    assert sel.NonConstantSelection(-1)._to_proto().non_constant.loop_axis == -1
    assert sel.PercentileSelection(12.5)._to_proto().percentile.percentile == 12.5
    subject = sel.SubjectSelection(["a", 3, np.int64(1), "b"])._to_proto().subject
    assert list(subject.subjects) == ["a", "b"] and list(subject.subject_indices) == [3, 1]
    assert list(sel.SubjectSelection("a")._to_proto().subject.subjects) == ["a"]
    assert list(sel.SubjectSelection(2)._to_proto().subject.subject_indices) == [2]
    composed = sel.ComposeSelection([sel.WithForegroundSelection(), sel.ComposeSelection([])])._to_proto().compose
    assert [s.WhichOneof("strategy") for s in composed.strategies] == ["with_foreground", "compose"]
    with pytest.raises(NotImplementedError):
        sel.ComposeSelection([lambda sample: True])._to_proto()


def test_bad_parameters() -> None:
    for p in (-0.5, 100.5, float("nan")):
        with pytest.raises(ValueError, match="percentile must lie in"):
            sel.PercentileSelection(p)
    with pytest.raises(TypeError, match="subjects are names"):
        sel.SubjectSelection(["a", 1.5])  # type: ignore[list-item]


def test_subject_selection_here_reads_a_subject_extractors_entries() -> None:
    strategy = sel.SubjectSelection(["b", 2])
    assert strategy({"subject": "b", "subject_index": 0}) and strategy({"subject": "z", "subject_index": 2})
    assert not strategy({"subject": "a", "subject_index": 0})
    assert repr(strategy) == "SubjectSelection (b,2)"
    with pytest.raises(KeyError, match="SubjectExtractor"):
        strategy({"images": np.zeros(2)})


def test_loop_axis_and_empty_samples_here() -> None:
    per_channel = np.stack([np.zeros((3, 3)), np.ones((3, 3))], axis=-1)
    assert sel.NonConstantSelection()({"images": per_channel})
    assert not sel.NonConstantSelection(-1)({"images": per_channel})
    with pytest.raises(ValueError, match="loop_axis 3 is out of bounds"):
        sel.NonConstantSelection(3)({"images": per_channel})
    empty = {"images": np.zeros((0, 2))}
    assert not sel.NonConstantSelection()(empty) and not sel.PercentileSelection(10)(empty)


def test_select_indices_over_any_iterable_datasource() -> None:
    samples = _samples()
    strategy = sel.ComposeSelection([sel.NonBlackSelection(), lambda sample: sample["subject"] != "a"])
    assert sel.select_indices(samples, strategy) == [1]
    assert sel.select_indices(samples, pm.extraction.WithForegroundSelection()) == [0, 2]
