"""The report: the targets (ratios within the run) and the printed table, ``bench.txt``."""

from __future__ import annotations

from typing import Any

from _link import link_lines
from _plan import (
    ASSEMBLERS,
    BATCH_SIZE,
    MB,
    TARGET_ASSEMBLY_VS_PYMIA,
    TARGET_AXIAL_VS_PYMIA_W2,
    TARGET_AXIS2_VS_PYMIA,
    TARGET_PATCH_VS_PYMIA,
    TARGET_SEED_LOOP_VS_PYMIA,
    TARGET_SERVER_RSS_MB,
    TARGET_TTFB_MS,
    TARGET_VS_CEILING,
    Mode,
    patterns,
)
from _scaling import scaling_lines

from patchwire.client._datasource import PREFETCH_MESSAGES


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, threshold: float, unit: str) -> None:
        passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out.append({"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "passed": passed})

    ceiling = report["ceiling"]["bytes_per_s"]
    cache_mb = report["server"]["small_cache_bytes"] / MB
    pw_res, pymia = report["patchwire"], report["pymia"]
    labels = {p.key: p.label for p in patterns(report["_mode"])}
    for key, result in pw_res.items():
        add(
            f"{labels[key]}: patchwire / ceiling (bytes/s)",
            result["bytes_per_s"] / ceiling,
            ">=",
            TARGET_VS_CEILING,
            "x",
        )
    add(
        f"{labels['axial']}: patchwire / pymia w=2 (samples/s)",
        pw_res["axial"]["samples_per_s"] / pymia["axial"]["workers2"]["samples_per_s"],
        ">=",
        TARGET_AXIAL_VS_PYMIA_W2,
        "x",
    )
    for workers in (0, 2):
        add(
            f"{labels['axis2']}: patchwire / pymia w={workers} (samples/s)",
            pw_res["axis2"]["samples_per_s"] / pymia["axis2"][f"workers{workers}"]["samples_per_s"],
            ">=",
            TARGET_AXIS2_VS_PYMIA,
            "x",
        )
    best_pymia_patch = max(pymia["patches"][w]["samples_per_s"] for w in ("workers0", "workers2"))
    add(
        f"{labels['patches']}: patchwire / best pymia (samples/s)",
        pw_res["patches"]["samples_per_s"] / best_pymia_patch,
        ">=",
        TARGET_PATCH_VS_PYMIA,
        "x",
    )
    for result in report["assembly"].values():  # like for like: pymia's assembler keeps everything in memory too
        add(
            f"assembly {result['label']}: in memory / pymia",
            result["patchwire_in_memory"]["subjects_per_s"] / result["pymia"]["subjects_per_s"],
            ">=",
            TARGET_ASSEMBLY_VS_PYMIA,
            "x",
        )
    for key, cells in report.get("seed_loop", {}).items():
        for cell_key, cell in cells.items():
            shuffle, workers = cell_key.removeprefix("shuffle").split("_workers")
            name = f"seed loop {labels[key]}, {'shuffled' if shuffle == '1' else 'in order'}, w={workers}"
            add(f"{name}: patchwire / pymia", cell["ratio"], ">=", TARGET_SEED_LOOP_VS_PYMIA, "x")
    for key, ms in report["ttfb"]["patchwire_ms"].items():
        add(f"{labels[key]}: patchwire time to first batch", ms, "<=", TARGET_TTFB_MS, "ms")
    add(
        f"server peak RSS, dataset > cache (400 MB + {cache_mb:.0f} MB cache)",
        report["rss"]["server_streaming_peak_mb"],
        "<=",
        TARGET_SERVER_RSS_MB + cache_mb,
        "MB",
    )
    return out


def format_table(report: dict[str, Any]) -> str:
    m, d = report["machine"], report["data"]
    mode: Mode = report["_mode"]
    lines = [
        f"patchwire benchmark ({mode.name}), {report['date']}",
        f"machine: {m['cpu']}, {m['cores_usable']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"numpy {m['numpy']}, torch {m['torch']}, grpcio {m['grpcio']}, h5py {m['h5py']}, pymia {m['pymia']}",
        f"data: {d['subjects']} subjects of {'x'.join(map(str, d['shape']))}, T1/T2 float32 + labels uint8, "
        f"{d['file_mb']:.0f} MB; batch {BATCH_SIZE}, shuffled; {mode.budget_s:g} s per loader after its warm-up (first "
        f"epoch, at most {mode.warmup_s:g} s; time to first batch is the warm-up's); MB = 10^6 bytes",
        f"patchwire serve block cache: the default --cache-mb {report['server']['default_cache_mib']} MiB (dataset "
        f"fits), and a small one, --cache-mb {report['server']['small_cache_mib']:g} MiB (dataset larger); "
        "throughput targets use the default",
        "",
    ]
    c = report["ceiling"]
    lines.append(
        f"ceiling: raw gRPC streaming of 1 MiB bytes messages: {c['gb_per_s']:.2f} GB/s (median of "
        f"{len(c['runs_gb_per_s'])} x {c['messages_per_run']} messages: half before patchwire's streaming, "
        f"{c['before_streaming_gb_per_s']:.2f} GB/s, half after it, {c['after_streaming_gb_per_s']:.2f} GB/s)"
    )
    lines.append("")
    header = f"{'pattern':<24} {'loader':<22} {'samples/s':>10} {'MB/s':>9} {'x ceiling':>10} {'TTFB ms':>9}"
    header += f" {'server RSS MB':>14}"
    lines += [header, "-" * len(header)]
    for p in patterns(mode):
        rows = [
            ("patchwire", report["patchwire"][p.key]),
            ("patchwire small cache", report["patchwire_small_cache"][p.key]),
            ("patchwire lz4 labels", report["patchwire_lz4_labels"][p.key]),
        ]
        rows += [(f"pymia w={w}", report["pymia"][p.key][f"workers{w}"]) for w in (0, 2)]
        for name, r in rows:
            rss = r.get("server_peak_rss_mb")
            lines.append(
                f"{p.label:<24} {name:<22} {r['samples_per_s']:>10.0f} {r['mb_per_s']:>9.0f} "
                f"{r['bytes_per_s'] / c['bytes_per_s']:>9.2f}x {r['ttfb_ms']:>9.1f} "
                f"{'' if rss is None else f'{rss:.0f}':>14}"
            )
    lines.append("")
    header = f"{'axial slices, patchwire serve --verify':<40} {'plain':>9} {'verify':>9} {'ratio':>7} {'start s':>13}"
    lines += [header, "-" * len(header)]
    for cache_key, shown in (("default_cache", "default cache"), ("small_cache", "small cache")):
        plain, verified = report["verify"][cache_key], report["verify"][f"{cache_key}_verify"]
        lines.append(
            f"{shown + ', samples/s':<40} {plain['samples_per_s']:>9.0f} {verified['samples_per_s']:>9.0f} "
            f"{verified['samples_per_s'] / plain['samples_per_s']:>6.2f}x "
            f"{plain['server_start_s']:>6.2f}/{verified['server_start_s']:<6.2f}"
        )
    lines.append("")
    labels = {p.key: p.label for p in patterns(mode)}
    header = f"{'with a training step (sleep) per batch':<40} {'step ms':>8} {'prefetch':>9} {'none':>9} {'gain':>7}"
    lines += [header, "-" * len(header)]
    for key, r in report["training_step"].items():
        with_pf, without = r[f"prefetch{PREFETCH_MESSAGES}"]["samples_per_s"], r["prefetch0"]["samples_per_s"]
        lines.append(
            f"{labels[key] + ', samples/s':<40} {r['step_ms']:>8g} {with_pf:>9.0f} {without:>9.0f} "
            f"{with_pf / without:>6.2f}x"
        )
    lines.append("")
    header = (
        f"{'assembly':<36} {'assembler':<28} {'subjects/s':>10} {'MB/s':>9} {'seconds':>8} {'x pymia':>8} "
        f"{'verified':>9}"
    )
    lines += [header, "-" * len(header)]
    names = {name: shown for name, (shown, _, _) in ASSEMBLERS.items()} | {"pymia": "pymia"}
    for result in report["assembly"].values():
        for name, shown in names.items():
            r = result[name]
            lines.append(
                f"{result['label']:<36} {shown:<28} {r['subjects_per_s']:>10.2f} {r['mb_per_s']:>9.0f} "
                f"{r['seconds']:>8.2f} {r['subjects_per_s'] / result['pymia']['subjects_per_s']:>7.2f}x "
                f"{'yes' if r['verified'] else 'NO':>9}"
            )
    disk = report["durable_writes"]
    lines += [
        "assembly context: with a state dir every batch is journalled and fsync'ed before it is acknowledged, and each",
        "  prediction byte is written twice (journal, finished volume): durable appends on this disk "
        f"{disk['mb_per_s']:.0f} MB/s ({disk['append_bytes'] >> 20} MiB,",
        f"  fsync each), so about {disk['mb_per_s'] / 2:.0f} MB/s; without one, jobs live in memory like pymia's.",
        "  On the server's host payloads go through shared memory (the first two patchwire rows). Over the wire",
        f"  posting and fetching back cross it twice: <= {c['bytes_per_s'] / 2 / MB:.0f} MB/s. Seconds: the median of "
        f"{report['_mode'].assembly_runs} interleaved run(s) of each",
        "  assembler; every run's are in the JSON (runs_seconds).",
    ]
    lines += ["", *_seed_loop_lines(report)]
    if "sampling" in report:
        lines += ["", *_sampling_lines(report)]
    if "link" in report:
        lines += ["", *link_lines(report["link"], mode)]
    if "scaling" in report:
        lines += ["", *scaling_lines(report["scaling"])]
    rss = report["rss"]
    lines.append("")
    lines.append("server peak RSS MB (VmHWM, reset per pattern):")
    for group, peaks in rss["server_peak_mb"].items():
        if isinstance(peaks, dict):
            lines.append(f"  {group}: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v is not None))
        elif peaks is not None:
            lines.append(f"  {group}: {peaks:.0f}")
    client = ", ".join(f"{k} {v:.0f}" for k, v in rss["client_peak_mb"].items() if v is not None)
    lines.append(f"client peak RSS MB: {client}; whole run (getrusage) {rss['client_maxrss_mb']:.0f}")
    lines.append("")
    header = f"{'target':<66} {'value':>9} {'target':>10} {'result':>7}"
    lines += [header, "-" * len(header)]
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}{t['unit'] if t['unit'] == 'x' else ''}"
        if t["unit"] != "x" and t["value"] is not None:
            value = f"{t['value']:.0f} {t['unit']}"
        bound = f"{t['op']} {t['threshold']:.4g}{t['unit'] if t['unit'] == 'x' else ' ' + t['unit']}"
        lines.append(f"{t['name']:<66} {value:>9} {bound:>10} {'PASS' if t['passed'] else 'FAIL':>7}")
    passed = sum(t["passed"] for t in report["targets"])
    lines.append(f"{passed}/{len(report['targets'])} targets met")
    return "\n".join(lines)


def _seed_loop_lines(report: dict[str, Any]) -> list[str]:
    """Section f: pymia's seed loop, only the construction lines changed (samples/s, median of interleaved rounds)."""
    labels = {p.key: p.label for p in patterns(report["_mode"])}
    lines = [
        "seed loop (DataExtractor images+labels, Permute, map-style PytorchDatasetAdapter, DataLoader batch 2), "
        "samples/s:",
        f"  {'pattern':<24} {'shuffle':>7} {'workers':>7} {'pymia local':>12} {'patchwire':>10} {'ratio':>7}",
    ]
    for key, cells in report["seed_loop"].items():
        for cell_key, cell in cells.items():
            shuffle, workers = cell_key.removeprefix("shuffle").split("_workers")
            lines.append(
                f"  {labels[key]:<24} {'yes' if shuffle == '1' else 'no':>7} {workers:>7} {cell['pymia']:>12.0f} "
                f"{cell['patchwire']:>10.0f} {cell['ratio']:>6.2f}x"
            )
    return lines


def _sampling_lines(report: dict[str, Any]) -> list[str]:
    """Section g: label-balanced random patches, without and with augmentation."""
    s, c, mode = report["sampling"], report["ceiling"], report["_mode"]
    lines = [
        f"random {mode.patch}^3 patches, label-balanced (centre label probabilities {s['label_probabilities']}), "
        f"{s['samples_per_volume']} per volume, batch {BATCH_SIZE}:",
        f"  {'loader':<52} {'samples/s':>10} {'MB/s':>8} {'x ceiling':>10} {'per server core-s':>18}",
    ]
    rows = [
        ("patchwire, sampled on the server", s["patchwire"]["plain"]),
        ("patchwire, sampled + augmented on the server", s["patchwire"]["augmented"]),
        ("TorchIO Queue + LabelSampler, local", s["torchio"]["plain"]),
        ("TorchIO Queue + LabelSampler + augmentation, local", s["torchio"]["augmented"]),
        ("pymia grid patches + RandomMirror/Rotation90, local", s["pymia"]["augmented"]),
    ]
    for name, r in rows:
        per_core = r.get("samples_per_server_cpu_s")
        fraction = r["bytes_per_s"] / c["bytes_per_s"]
        lines.append(
            f"  {name:<52} {r['samples_per_s']:>10.1f} {r['mb_per_s']:>8.0f} {fraction:>9.3f}x "
            f"{'' if per_core is None else f'{per_core:.1f}':>18}"
        )
    lines.append(
        "  augmentation: flips on 3 axes, affine (scales 0.9-1.1, 10 degrees), gamma, noise; TorchIO transforms whole "
        "subjects before sampling, patchwire each patch"
    )
    return lines
