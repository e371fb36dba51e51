"""The every-core section's pieces: which numbers of workers it measures, and its table from hand-made rows (nothing
here is timed; a real run of the section is part of the benchmark's smoke test)."""

from __future__ import annotations

import numpy as np
import pytest
from _scaling import ENV, _payload, parse_counts, scaling_lines, worker_counts


@pytest.mark.parametrize(
    ("cpus", "expected"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16]), (12, [1, 2, 4, 8, 12])]
)
def test_by_default_the_powers_of_two_up_to_the_usable_cores_and_the_cores(cpus: int, expected: list[int]) -> None:
    assert worker_counts({}, cpus) == expected


def test_the_environment_chooses_the_numbers() -> None:
    assert worker_counts({ENV: "8, 1,4,4"}, 2) == [1, 4, 8]


@pytest.mark.parametrize("text", ["", "0,1", "two", "-1"])
def test_numbers_that_are_not_positive_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_counts(text)


def test_a_batchs_payload_counts_every_array() -> None:
    batch = {"images": np.zeros((4, 3, 2), np.float32), "labels": np.zeros((4, 3), np.uint8)}
    batch["sample_index"] = np.arange(4, dtype=np.int64)
    assert _payload(batch) == (4, 96 + 12 + 32)


def test_the_table_has_a_row_per_pattern_and_number_of_workers() -> None:
    row = {"server_cores_busy": 0.9, "client_cores_busy": 1.0}
    scaling = {
        "cores_usable": 16,
        "budget_s": 4.0,
        "labels": {"axial": "axial slices (axis 0)"},
        "rows": {
            "axial": [
                {**row, "workers": 1, "samples_per_s": 2000.0, "gb_per_s": 0.7, "speedup": 1.0},
                {**row, "workers": 2, "samples_per_s": 3900.0, "gb_per_s": 1.4, "speedup": 1.95},
            ]
        },
    }
    lines = scaling_lines(scaling)
    assert lines[0].split()[-9:] == ["N", "samples/s", "GB/s", "x", "N=1", "server", "cores", "client", "cores"]
    assert lines[2].split()[-6:] == ["1", "2000", "0.70", "1.00x", "0.90", "1.00"]
    assert lines[3].split()[-6:] == ["2", "3900", "1.40", "1.95x", "0.90", "1.00"]
    assert "16 usable cores" in lines[4]
