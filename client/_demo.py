"""``patchwire demo``: the seed example (slice-wise extraction, channel-first, a torch DataLoader with batch size 2,
a small convolutional network, predictions back to channel-last) against a real patchwire server.

Without ``--address`` it starts ``patchwire serve --phantom`` on a free port in a child process (the phantom
dataset, 4 subjects of 181x217x181 with T1/T2 and a label map, is generated on first use) and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DemoSummary", "run_demo", "run_seed_pipeline"]


@dataclass
class DemoSummary:
    slices: dict[int, int] = field(default_factory=dict)
    """Predicted slices per subject index."""
    prediction_means: dict[int, float] = field(default_factory=dict)
    foreground: dict[int, float] = field(default_factory=dict)
    """Fraction of predicted voxels above 0.5 per subject."""
    seconds: float = 0.0
    megabytes: float = 0.0


@contextlib.contextmanager
def _phantom_server() -> Iterator[str]:
    cmd = [sys.executable, "-m", "patchwire.service", "--log-level", "WARNING", "serve", "--phantom", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("patchwire listening on "):
            raise RuntimeError(f"the patchwire server did not start (exit code {proc.wait()})")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def run_seed_pipeline(
    address: str, dataset: str, batch_size: int = 2, workers: int = 0, progress: bool = True
) -> DemoSummary:
    import torch
    import torch.nn as nn
    import torch.utils.data as torch_data
    from tqdm import tqdm

    import patchwire.client as pw
    from patchwire.client import definition as defs
    from patchwire.client import extraction as extr
    from patchwire.client import transformation as tfm
    from patchwire.client.torch import PytorchDatasetAdapter

    client = pw.connect(address)
    extractor = extr.DataExtractor(categories=(defs.KEY_IMAGES,))
    transform = tfm.Permute(permutation=(2, 0, 1), entries=(defs.KEY_IMAGES,))
    datasource = client.datasource(dataset, extr.SliceIndexing(), extractor, transform)

    loader = torch_data.DataLoader(
        PytorchDatasetAdapter(datasource), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(in_channels=2, out_channels=8, kernel_size=3, padding=1),
        nn.Conv2d(in_channels=8, out_channels=1, kernel_size=3, padding=1),
        nn.Sigmoid(),
    ).eval()

    subject_of = np.empty(len(datasource), dtype=np.int64)
    for subject in datasource.subjects:
        first = subject.first_sample_index
        subject_of[first : first + subject.sample_count] = subject.subject_index
    summary = DemoSummary()
    sums: dict[int, float] = {}
    above: dict[int, float] = {}
    voxels: dict[int, int] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(loader, desc="predicting slices", unit="batch", disable=not progress):
            x, sample_indices = batch[defs.KEY_IMAGES], batch[defs.KEY_SAMPLE_INDEX]
            prediction = network(x)
            numpy_prediction = prediction.numpy().transpose((0, 2, 3, 1))  # back to (B)HWC, channel last
            summary.megabytes += x.numel() * x.element_size() / 1e6
            for p, i in zip(numpy_prediction, sample_indices.numpy(), strict=True):
                s = int(subject_of[i])
                summary.slices[s] = summary.slices.get(s, 0) + 1
                sums[s] = sums.get(s, 0.0) + float(p.sum(dtype=np.float64))
                above[s] = above.get(s, 0.0) + float((p > 0.5).sum())
                voxels[s] = voxels.get(s, 0) + p.size
    summary.seconds = time.perf_counter() - start
    for s in summary.slices:
        summary.prediction_means[s] = sums[s] / voxels[s]
        summary.foreground[s] = above[s] / voxels[s]
    datasource.close()
    client.close()
    return summary


def run_demo(args: argparse.Namespace) -> int:
    import patchwire.client as pw

    with contextlib.ExitStack() as stack:
        address = args.address
        if address is None:
            print(
                "starting a patchwire server on a free port (the phantom dataset is generated on first use)", flush=True
            )
            address = stack.enter_context(_phantom_server())
        print(f"server {address}, dataset {args.dataset!r}", flush=True)
        try:
            summary = run_seed_pipeline(
                address, args.dataset, args.batch_size, args.workers, progress=not args.no_progress
            )
            names = pw.connect(address).describe(args.dataset).subjects
        except pw.PatchwireError as exc:
            print(f"patchwire demo: {exc}", file=sys.stderr)
            return 1
    total = sum(summary.slices.values())
    for s, count in sorted(summary.slices.items()):
        print(
            f"  {names[s].name}: {count} slices predicted, mean prediction {summary.prediction_means[s]:.4f}, "
            f"{100 * summary.foreground[s]:.1f}% above 0.5"
        )
    print(
        f"{total} slices of {len(summary.slices)} subjects in {summary.seconds:.2f} s "
        f"({total / summary.seconds:.0f} slices/s, {summary.megabytes / summary.seconds:.0f} MB/s of input)"
    )
    print("(assembling predictions into volumes on the server comes with the assembly service)")
    return 0
