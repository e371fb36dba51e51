"""The figure, ``bench.png``: streaming throughput against the ceiling, assembly, and time to first batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from _plan import ASSEMBLERS, TARGET_TTFB_MS, Mode, patterns


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode: Mode = report["_mode"]
    pats = patterns(mode)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 2, 2]})
    ceiling_mb = report["ceiling"]["mb_per_s"]

    ax = axes[0]
    small = f"patchwire, cache {report['server']['small_cache_mib']:g} MiB"
    loaders: list[tuple[str, str, Callable[[str], dict[str, Any]]]] = [
        ("patchwire", "#1f77b4", lambda key: report["patchwire"][key]),
        (small, "#9ecae1", lambda key: report["patchwire_small_cache"][key]),
        ("patchwire, lz4 labels", "#6baed6", lambda key: report["patchwire_lz4_labels"][key]),
        ("pymia w=0", "#ff7f0e", lambda key: report["pymia"][key]["workers0"]),
        ("pymia w=2", "#2ca02c", lambda key: report["pymia"][key]["workers2"]),
    ]
    width = 0.16
    offset = (len(loaders) - 1) / 2
    for j, (name, color, result) in enumerate(loaders):
        values = [result(p.key)["mb_per_s"] for p in pats]
        ax.bar([i + (j - offset) * width for i in range(len(pats))], values, width, label=name, color=color)
    ax.axhline(ceiling_mb, color="k", linestyle="--", linewidth=1, label=f"gRPC ceiling {ceiling_mb:.0f} MB/s")
    ax.axhline(0.7 * ceiling_mb, color="grey", linestyle=":", linewidth=1, label="0.7x ceiling (target)")
    ax.set_yscale("log")
    ax.set_ylim(top=ceiling_mb * 12)  # room for the legend above the ceiling line
    ax.set_xticks(range(len(pats)), [p.label for p in pats])
    ax.set_ylabel("MB/s delivered to torch (log)")
    ax.set_title("streaming, batch 16, shuffled")
    ax.legend(fontsize=7, loc="upper center", ncol=3)

    ax = axes[1]
    cases = list(report["assembly"].values())
    colors = ["#1f77b4", "#aec7e8", "#9edae5"]
    bars = [(name, shown, colors[j]) for j, (name, (shown, _, _)) in enumerate(ASSEMBLERS.items())]
    bars.append(("pymia", "pymia", "#ff7f0e"))
    width = 0.8 / len(bars)
    for j, (name, label, color) in enumerate(bars):
        values = [c[name]["mb_per_s"] for c in cases]
        offset = (j - (len(bars) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(cases))], values, width, label=label, color=color)
    ax.set_xticks(range(len(cases)), [c["label"] for c in cases], fontsize=8)
    ax.set_ylabel("MB/s of predictions")
    ax.set_title("assembly of whole subjects")
    ax.legend(fontsize=8)

    ax = axes[2]
    for j, (name, color, result) in enumerate(loaders):
        values = [result(p.key)["ttfb_ms"] for p in pats]
        ax.bar([i + (j - offset) * width for i in range(len(pats))], values, width, label=name, color=color)
    ax.axhline(TARGET_TTFB_MS, color="grey", linestyle=":", linewidth=1, label=f"{TARGET_TTFB_MS:g} ms (target)")
    ax.set_xticks(range(len(pats)), [p.label for p in pats], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("time to first batch")
    ax.legend(fontsize=7)

    m = report["machine"]
    fig.suptitle(f"patchwire benchmark ({mode.name}) - {m['cpu']}, {m['cores_usable']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
