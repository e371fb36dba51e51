"""The benchmark harness in smoke mode: ``benchmarks/bench.py --smoke`` runs to the end and reports every section.

Timings are not checked (they depend on the machine and its load), only that each section measured something and
that the outputs (JSON, PNG) are written. The full run checks the targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench.py"
TIMEOUT_S = 300
PATTERNS = ("axial", "axis2", "patches")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(value: Any, where: str) -> None:
    assert isinstance(value, int | float) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    assert value > 0, f"{where}: {value!r} is not positive"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHWIRE_")}
    env.update(PYTHONWARNINGS="ignore::DeprecationWarning", MPLBACKEND="Agg", MPLCONFIGDIR=str(out / "mpl"))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=REPO,
    )
    return proc, out


@pytest.mark.slow
def test_smoke_run_exits_zero_and_prints_the_table(smoke_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = smoke_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "targets met" in proc.stdout
    assert "ceiling: raw gRPC streaming" in proc.stdout
    assert "assembly context: with a state dir every batch is journalled" in proc.stdout
    assert "seed loop (DataExtractor images+labels" in proc.stdout
    assert "every core (--workers N, N clients)" in proc.stdout
    assert (
        "link: the loopback of a network namespace limited to 10gbit" in proc.stdout
        or "link (rate-limited network namespace): SKIPPED" in proc.stdout
    )


@pytest.mark.slow
def test_smoke_json_has_every_section(smoke_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())

    for key in ("cpu", "cores", "memory_gib", "python", "numpy", "torch", "grpcio"):
        assert report["machine"][key], key
    ceiling = report["ceiling"]
    _positive(ceiling["gb_per_s"], "ceiling")
    _positive(ceiling["before_streaming_gb_per_s"], "ceiling before patchwire's streaming")
    _positive(ceiling["after_streaming_gb_per_s"], "ceiling after patchwire's streaming")
    assert len(ceiling["runs_gb_per_s"]) == 2 * report["mode"]["ceiling_runs"]
    assert min(ceiling["runs_gb_per_s"]) <= ceiling["gb_per_s"] <= max(ceiling["runs_gb_per_s"])
    _positive(report["durable_writes"]["mb_per_s"], "durable writes")

    for pattern in PATTERNS:
        for section in ("patchwire", "patchwire_small_cache", "patchwire_lz4_labels"):
            result = report[section][pattern]
            for metric in ("samples_per_s", "mb_per_s", "ttfb_ms", "server_peak_rss_mb", "warmup_samples"):
                _positive(result[metric], f"{section} {pattern} {metric}")
            assert result["samples"] > 0, f"{section} {pattern}: nothing measured after the warm-up"
        for workers in ("workers0", "workers2"):
            result = report["pymia"][pattern][workers]
            for metric in ("samples_per_s", "mb_per_s", "ttfb_ms", "warmup_samples"):
                _positive(result[metric], f"pymia {pattern} {workers} {metric}")
        _positive(report["ttfb"]["patchwire_ms"][pattern], f"ttfb {pattern}")

    assert set(report["training_step"]) == {"axial", "patches"}
    for pattern, result in report["training_step"].items():
        _positive(result["step_ms"], f"training step {pattern}")
        for run in ("prefetch2", "prefetch0"):
            _positive(result[run]["samples_per_s"], f"training step {pattern} {run}")

    assert set(report["verify"]) == {"default_cache", "default_cache_verify", "small_cache", "small_cache_verify"}
    for key, result in report["verify"].items():
        for metric in ("samples_per_s", "server_start_s"):
            _positive(result[metric], f"verify {key} {metric}")

    assert set(report["assembly"]) == {"slice", "patch"}
    for case, result in report["assembly"].items():
        for assembler in ("patchwire", "patchwire_in_memory", "patchwire_in_memory_wire", "pymia"):
            for metric in ("subjects_per_s", "mb_per_s"):
                _positive(result[assembler][metric], f"assembly {case} {assembler} {metric}")
            assert result[assembler]["subjects"] == report["mode"]["subjects"]
            assert result[assembler]["verified"], f"assembly {case} {assembler}: subject 0 differs from its images"
            assert len(result[assembler]["runs_seconds"]) == report["mode"]["assembly_runs"]
        assert result["patchwire"]["shared_memory"] and result["patchwire_in_memory"]["shared_memory"]
        assert not result["patchwire_in_memory_wire"]["shared_memory"]

    assert set(report["seed_loop"]) == {"axial", "patches"}
    for pattern, cells in report["seed_loop"].items():
        assert set(cells) == {f"shuffle{s}_workers{w}" for s in (0, 1) for w in (0, 2)}
        for cell_key, cell in cells.items():
            for metric in ("pymia", "patchwire", "ratio"):
                _positive(cell[metric], f"seed loop {pattern} {cell_key} {metric}")

    rss = report["rss"]
    _positive(rss["server_streaming_peak_mb"], "server streaming RSS")
    _positive(report["server"]["small_cache_mib"], "small block cache")
    _positive(rss["client_maxrss_mb"], "client RSS")
    for section, value in rss["client_peak_mb"].items():
        _positive(value, f"client RSS {section}")

    link = report["link"]  # a 10 Gbit/s link in a network namespace: measured as root, else skipped with the reason
    if link["skipped"] is None:
        for part in ("link", "loopback"):
            _positive(link[part]["ceiling_gb_per_s"], f"link {part} raw gRPC")
            for pattern in PATTERNS:
                for codec, row in link[part]["streaming"][pattern].items():
                    for metric in ("samples_per_s", "compression_ratio"):
                        _positive(row[metric], f"link {part} {pattern} {codec} {metric}")
                    assert row["server_cpu_s_per_gb"] >= 0 and row["client_cpu_s_per_gb"] >= 0  # clock ticks: may be 0
        for case in ("slice", "patch"):
            assert all(row["verified"] for row in link["link"]["assembly"][case].values() if isinstance(row, dict))
    else:
        assert isinstance(link["skipped"], str) and link["skipped"]

    scaling = report["scaling"]  # patchwire serve --workers N with N clients: smoke mode measures N = 1 and 2
    assert scaling["counts"] == [1, 2]
    for pattern, rows in scaling["rows"].items():
        assert [row["workers"] for row in rows] == [1, 2]
        for row in rows:
            for metric in ("samples_per_s", "gb_per_s", "speedup", "server_cores_busy", "client_cores_busy"):
                _positive(row[metric], f"scaling {pattern} {row['workers']} workers {metric}")

    targets = report["targets"]
    assert len(targets) >= 13
    for target in targets:
        assert isinstance(target["passed"], bool), target
        _positive(target["value"], target["name"])


@pytest.mark.slow
def test_smoke_writes_a_png(smoke_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stderr
    png = out / "bench.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC
