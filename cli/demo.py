"""``patchwire demo``: the seed example (slice-wise extraction, channel-first, a torch DataLoader with batch size 2,
a small convolutional network, predictions back to channel-last) against a real patchwire server.

Without ``--address`` it starts ``patchwire serve --phantom`` on a free port in a child process (the phantom
dataset, 4 subjects of 181x217x181 with T1/T2 and a label map, is generated on first use) and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from patchwire.cli._flags import add_credential_flags
from patchwire.cli.launch import launch_server

if TYPE_CHECKING:
    from patchwire.client import Credentials

__all__ = ["DemoSummary", "add_parser", "run", "run_demo", "run_seed_pipeline"]


@dataclass
class SubjectResult:
    """What the demo reports for one assembled subject."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    slices: int
    checked: bool
    """The assembled volume equals the slice predictions the client made (checksum and per-slice spot checks)."""
    foreground: float
    """Fraction of voxels predicted above 0.5."""
    dice: float
    """Dice of (prediction > 0.5) against the label map's foreground (labels > 0)."""


@dataclass
class DemoSummary:
    subjects: dict[int, SubjectResult] = field(default_factory=dict)
    seconds: float = 0.0
    megabytes: float = 0.0
    job_id: str = ""
    input_stats: str = ""
    """The datasource's statistics of the prediction loop (:meth:`patchwire.client.LoaderStats.summary`)."""


def run_seed_pipeline(
    address: str,
    dataset: str,
    batch_size: int = 2,
    workers: int = 0,
    progress: bool = True,
    credentials: Credentials | None = None,
) -> DemoSummary:
    """The seed example, with the datasource and the assembler on the server."""
    import torch
    import torch.nn as nn
    import torch.utils.data as torch_data
    from tqdm import tqdm

    import patchwire.client as pw
    from patchwire.client import definition as defs
    from patchwire.client import extraction as extr
    from patchwire.client import transformation as tfm
    from patchwire.client.torch import PytorchDatasetAdapter

    client = pw.connect(address, credentials=credentials)
    extractor = extr.DataExtractor(categories=(defs.KEY_IMAGES,))
    transform = tfm.Permute(permutation=(2, 0, 1), entries=(defs.KEY_IMAGES,))
    datasource = client.datasource(dataset, extr.SliceIndexing(), extractor, transform)
    assembler = client.assembler(datasource)
    direct_extractor = extr.ComposeExtractor(
        [extr.ImagePropertiesExtractor(), extr.DataExtractor(categories=(defs.KEY_LABELS,))]
    )

    loader = torch_data.DataLoader(
        PytorchDatasetAdapter(datasource), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(in_channels=2, out_channels=8, kernel_size=3, padding=1),
        nn.Conv2d(in_channels=8, out_channels=1, kernel_size=3, padding=1),
        nn.Sigmoid(),
    ).eval()

    names = {s.index: s.name for s in client.describe(dataset).subjects}
    first_of = {s.subject_index: s.first_sample_index for s in datasource.subjects}
    subject_of = np.empty(len(datasource), dtype=np.int64)
    for subject in datasource.subjects:
        first = subject.first_sample_index
        subject_of[first : first + subject.sample_count] = subject.subject_index
    checksums: dict[int, float] = {}
    spot: dict[int, tuple[int, np.ndarray]] = {}  # one slice per subject kept for an exact check
    summary = DemoSummary()
    nb_batches = len(loader)
    start = time.perf_counter()
    with torch.no_grad():
        timed = datasource.stats.timed(loader)  # what the loop waits for, also with DataLoader workers
        bar = tqdm(timed, desc="predicting and assembling", unit="batch", total=nb_batches, disable=not progress)
        for i, batch in enumerate(bar):
            x, sample_indices = batch[defs.KEY_IMAGES], batch[defs.KEY_SAMPLE_INDEX]
            prediction = network(x)
            numpy_prediction = prediction.numpy().transpose((0, 2, 3, 1))  # back to (B)HWC, channel last
            summary.megabytes += x.numel() * x.element_size() / 1e6
            for p, k in zip(numpy_prediction, sample_indices.numpy(), strict=True):
                s = int(subject_of[k])
                checksums[s] = checksums.get(s, 0.0) + float(p.sum(dtype=np.float64))
                local = int(k) - first_of[s]
                if local == 90:
                    spot[s] = (local, p.copy())

            is_last = i == nb_batches - 1
            assembler.add_batch(numpy_prediction, sample_indices.numpy(), is_last)

            for subject_index in assembler.subjects_ready:
                subject_prediction = assembler.get_assembled_subject(subject_index)
                direct_sample = datasource.direct_extract(direct_extractor, subject_index)
                target = direct_sample[defs.KEY_LABELS]
                summary.subjects[subject_index] = _evaluate(
                    names[subject_index],
                    subject_prediction,
                    target,
                    checksums.get(subject_index, 0.0),
                    spot.get(subject_index),
                    int((subject_of == subject_index).sum()),
                )
    summary.seconds = time.perf_counter() - start
    summary.input_stats = datasource.stats.summary()
    summary.job_id = assembler.job_id or ""
    assembler.close()
    datasource.close()
    client.close()
    return summary


def _evaluate(
    name: str, volume: np.ndarray, target: np.ndarray, checksum: float, spot: tuple[int, np.ndarray] | None, slices: int
) -> SubjectResult:
    total = float(volume.sum(dtype=np.float64))
    checked = abs(total - checksum) <= 1e-6 * max(1.0, abs(checksum))
    if spot is not None:
        checked = checked and bool(np.array_equal(volume[spot[0]], spot[1]))
    predicted = volume[..., 0] > 0.5
    truth = target[..., 0] > 0
    denominator = int(predicted.sum()) + int(truth.sum())
    dice = 2.0 * int((predicted & truth).sum()) / denominator if denominator else 1.0
    return SubjectResult(name, tuple(volume.shape), str(volume.dtype), slices, checked, float(predicted.mean()), dice)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``demo`` and its flags to the ``patchwire`` command's subparsers."""
    demo = sub.add_parser("demo", help="run the seed pipeline against a server on a built-in phantom dataset")
    demo.add_argument("--address", help="use this running server (HOST:PORT) instead of starting one")
    demo.add_argument("--dataset", default="phantom", help="dataset name on that server (default phantom)")
    demo.add_argument("--batch-size", type=int, default=2)
    demo.add_argument("--workers", type=int, default=0, help="torch DataLoader workers")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_credential_flags(demo)


def run(args: argparse.Namespace) -> int:
    """Runs ``patchwire demo``, or says what to install when the client cannot be imported."""
    try:
        import patchwire.client  # noqa: F401
    except ImportError as exc:
        print(f"patchwire demo needs the torch client: pip install 'patchwire[server,torch]' ({exc})", file=sys.stderr)
        return 2
    return run_demo(args)


@contextlib.contextmanager
def _phantom_server() -> Iterator[str]:
    """``patchwire serve --phantom`` on a free port with a temporary state folder; its stderr is this process's."""
    with (
        tempfile.TemporaryDirectory(prefix="patchwire-demo-", ignore_cleanup_errors=True) as state,
        launch_server({}, ("--phantom", "--state-dir", state), stderr=None) as server,
    ):
        yield server.address


def run_demo(args: argparse.Namespace) -> int:
    import patchwire.client as pw
    from patchwire.client import Credentials

    try:
        credentials = Credentials.from_args(args, os.environ)
    except (OSError, ValueError) as exc:
        print(f"patchwire demo: credentials: {exc}", file=sys.stderr)
        return 2
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
                address,
                args.dataset,
                args.batch_size,
                args.workers,
                progress=not args.no_progress,
                credentials=credentials if args.address is not None else None,
            )
        except pw.PatchwireError as exc:
            print(f"patchwire demo: {exc}", file=sys.stderr)
            return 1
    total = sum(r.slices for r in summary.subjects.values())
    for _, r in sorted(summary.subjects.items()):
        shape = "x".join(map(str, r.shape))
        print(
            f"  {r.name}: assembled {shape} {r.dtype} from {r.slices} slices, "
            f"{'checked' if r.checked else 'MISMATCH'}, {100 * r.foreground:.1f}% foreground, "
            f"Dice vs labels {r.dice:.3f}"
        )
    print(
        f"{total} slices of {len(summary.subjects)} subjects predicted and assembled on the server in "
        f"{summary.seconds:.2f} s ({total / summary.seconds:.0f} slices/s, "
        f"{summary.megabytes / summary.seconds:.0f} MB/s of input; job {summary.job_id})"
    )
    print(f"input: {summary.input_stats}")
    return 0 if summary.subjects and all(r.checked for r in summary.subjects.values()) else 1
