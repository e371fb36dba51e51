"""Train a small 3-D U-Net against a patchwire server, then segment held-out subjects through its assembler.

::

    python examples/train_segmentation.py                      # 8 phantom subjects: 6 to train, 2 held out
    python examples/train_segmentation.py --sampler uniform    # the same with patch centres drawn uniformly
    python examples/train_segmentation.py --address HOST:PORT --dataset phantom   # a server already running
    python examples/train_segmentation.py --address HOST:PORT --ca-cert ca.crt --token-file writer.token  # TLS

What it shows, end to end:

1. **Data.** Without ``--address`` it writes a phantom dataset (181 x 217 x 181 brains with T1 and T2 and a label map:
   0 background, 1 white matter, 2 grey matter, 3 hippocampus, 4 amygdala, 5 thalamus) and starts ``patchwire
   serve`` on it in a child process. The last ``--held-out`` subjects are never trained on: the training datasource
   names the others in its ``subject_subset``.
2. **Training.** Two ranks (``torch.multiprocessing`` spawn, gloo, one thread each; or torchrun's environment) train
   a DistributedDataParallel U-Net. Every patch is drawn by the server (``--sampler label``: centres balanced over
   the six labels, :class:`~patchwire.client.extraction.LabelSampler`; ``uniform``: anywhere in the volume) and
   augmented there (left-right flip, affine, intensity scaling, noise), so the ranks spend their cores on the
   network. The stream is sharded by rank; each epoch's patches and augmentations depend on (seed, epoch) only.
   Training stops after ``--minutes``; the ranks agree on the clock every step, so both stop at the same one.
3. **Inference.** A sliding window of overlapping patches over each held-out subject; both ranks post softmax
   probabilities for their share of the patches to one assembly job with Gaussian blending, and the server
   declares a subject ready once every one of its patches has arrived, whoever sent it.
4. **Evaluation.** Each assembled subject's argmax is compared with its label map (Dice per label and subject), its
   probabilities are exported by the server as NIfTI with the original geometry (``<out>/<subject>_probabilities
   .nii.gz``) and the segmentation is written beside them (``<subject>_segmentation.nii.gz``, with SimpleITK where
   it is installed); then the job is deleted. ``<out>/metrics.json`` holds the figures and the timings,
   ``<out>/model.pt`` the weights.

Needs ``pip install 'patchwire[server,torch]'`` (the client alone, ``patchwire[torch]``, with ``--address``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import patchwire.client as pw
from patchwire.cli._flags import add_credential_flags
from patchwire.client import augmentation as aug
from patchwire.client import definition as defs
from patchwire.client import extraction as extr
from patchwire.client import transformation as tfm
from patchwire.client.torch import PytorchStreamingDataset

LABELS = ("background", "white matter", "grey matter", "hippocampus", "amygdala", "thalamus")
INTENSITY_SCALE = 1000.0
"""The phantom's intensities lie in about [0, 1000]: the network sees them divided by this."""
GROUP_TIMEOUT_S = 600
"""Bound for a collective that never completes (a rank that died), never a pace."""


@dataclass(frozen=True)
class Config:
    """Everything a rank needs (picklable: spawned ranks get a copy)."""

    address: str
    """The server (HOST:PORT)."""
    dataset: str
    train_subjects: tuple[str, ...]
    """Subjects the training patches come from (the datasource's subject subset)."""
    held_out: tuple[str, ...]
    """Subjects segmented and evaluated after training, never trained on."""
    out: str
    """Folder of metrics.json, model.pt and the NIfTI files."""
    sampler: str = "label"
    """"label": patch centres balanced over the labels; "uniform": anywhere in the volume."""
    minutes: float = 10.0
    """Training time; the ranks stop together at the first step past it."""
    patch: int = 48
    """Edge of the cubic patches, in training and in the sliding window."""
    batch_size: int = 2
    """Patches per rank and step."""
    samples_per_volume: int = 16
    """Patches per training subject and epoch."""
    channels: int = 16
    """U-Net channels at its finest (half-resolution) level."""
    depth: int = 3
    """U-Net downsamplings after the stem."""
    learning_rate: float = 1e-2
    """Peak learning rate (AdamW; a short warm-up, then polynomial decay over the time budget)."""
    small_weight: float = 5.0
    """Cross-entropy weight of the three small structures (the others weigh 1)."""
    overlap: float = 0.5
    """Overlap of neighbouring sliding-window patches, per axis."""
    seed: int = 0
    """Seed of the initial weights and of the server's patch draws and augmentation."""
    threads: int = 1
    """Torch threads per rank."""
    augment: bool = True
    export: bool = True
    log_every_s: float = 30.0
    credentials: pw.Credentials = field(default_factory=pw.Credentials, repr=False)
    """How every rank reaches the server (TLS trust, client certificate, token; none by default)."""


# -- the network -----------------------------------------------------------------------------------------------------


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each with instance normalisation and a leaky ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3d(nn.Module):
    """A small 3-D U-Net that works at half resolution: a stride-2 convolution halves the image, a U-Net with
    ``depth`` strided-convolution downsamplings (``channels`` doubled at each, transposed convolutions and skip
    connections back up) runs there, and a light full-resolution head that sees the input again brings the result
    back to every voxel, with one logit per class. On CPUs this costs about an eighth of a full-resolution U-Net's
    finest level and doubles the receptive field, which is what tells a hippocampus from grey matter of the same
    intensity."""

    def __init__(self, in_channels: int = 2, classes: int = len(LABELS), channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        widths = [channels * 2**level for level in range(depth + 1)]
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, channels, 2, stride=2),
            nn.InstanceNorm3d(channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.encoders = nn.ModuleList(ConvBlock(widths[max(level - 1, 0)], widths[level]) for level in range(depth))
        self.downs = nn.ModuleList(nn.Conv3d(widths[level], widths[level], 2, stride=2) for level in range(depth))
        self.bottom = ConvBlock(widths[depth - 1], widths[depth])
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2) for level in range(depth)
        )
        self.decoders = nn.ModuleList(ConvBlock(2 * widths[level], widths[level]) for level in range(depth))
        full = max(channels // 2, classes)
        self.full_resolution = nn.ConvTranspose3d(channels, full, 2, stride=2)
        self.head = nn.Sequential(
            nn.Conv3d(full + in_channels, full, 3, padding=1),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(full, classes, 1),
        )
        self.multiple = 2 ** (depth + 1)
        """Each spatial size of an input must be a multiple of this."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image = x / INTENSITY_SCALE
        x = self.stem(x)
        skips = []
        for encode, down in zip(self.encoders, self.downs, strict=True):
            x = encode(x)
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](torch.cat([self.ups[level](x), skips[level]], dim=1))
        return self.head(torch.cat([self.full_resolution(x), image], dim=1))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy plus the soft Dice loss of the foreground labels (over the whole batch, nnU-Net's "batch
    Dice")."""
    ce = F.cross_entropy(logits, target, weight=class_weights)
    probabilities = logits.softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probabilities.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + 1.0) / (denominator + 1.0)
    return ce + (1 - dice).mean()


def dice_scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of each foreground label (NaN where a label is in neither volume)."""
    scores = {}
    for label in range(1, len(LABELS)):
        p, t = prediction == label, truth == label
        denominator = int(p.sum()) + int(t.sum())
        scores[LABELS[label]] = 2.0 * int((p & t).sum()) / denominator if denominator else math.nan
    return scores


# -- what the server does for the ranks ------------------------------------------------------------------------------


def training_datasource(client: pw.Client, config: Config) -> pw.RemoteDatasource:
    """Random patches of the training subjects, drawn and augmented by the server, images and labels channel-first."""
    if config.sampler == "label":
        sampler: extr.IndexingStrategy = extr.LabelSampler(
            config.patch,
            label_probabilities=dict.fromkeys(range(len(LABELS)), 1.0),
            samples_per_volume=config.samples_per_volume,
        )
    else:
        sampler = extr.UniformSampler(config.patch, samples_per_volume=config.samples_per_volume)
    steps: list[tfm.Transform] = []
    if config.augment:  # on channel-last (z, y, x, channel) arrays, as the server extracts them
        steps += [
            aug.RandomFlip(axes=(2,)),  # left-right: the phantom's structures come in mirrored pairs
            aug.RandomAffine(scales=(0.9, 1.1), degrees=10),
            aug.RandomIntensityScaleShift(scale=0.1, shift=0.0),
            aug.RandomNoise(std=(0.0, 15.0)),
        ]
    steps.append(tfm.Permute(permutation=(3, 0, 1, 2), entries=(defs.KEY_IMAGES, defs.KEY_LABELS)))
    return client.datasource(
        config.dataset,
        sampler,
        extr.DataExtractor(categories=(defs.KEY_IMAGES, defs.KEY_LABELS)),
        tfm.ComposeTransform(steps),
        subject_subset=list(config.train_subjects),
    )


def inference_datasource(client: pw.Client, config: Config) -> pw.RemoteDatasource:
    """A sliding window of overlapping patches over the held-out subjects, images channel-first."""
    return client.datasource(
        config.dataset,
        extr.PatchWiseIndexing((config.patch,) * 3, overlap=config.overlap),
        extr.DataExtractor(categories=(defs.KEY_IMAGES,)),
        tfm.Permute(permutation=(3, 0, 1, 2), entries=(defs.KEY_IMAGES,)),
        subject_subset=list(config.held_out),
    )


# -- one rank --------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


def train(config: Config, network: nn.Module, rank: int) -> dict[str, Any]:
    """Trains ``network`` (DDP-wrapped) for ``config.minutes``; returns the figures of the run."""
    client = pw.connect(config.address, credentials=config.credentials)
    datasource = training_datasource(client, config)
    stream = PytorchStreamingDataset(datasource, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None)
    # the small structures weigh more in the cross-entropy: they are few voxels even in patches centred on them
    class_weights = torch.tensor([1.0, 1.0, 1.0] + [config.small_weight] * (len(LABELS) - 3))
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    budget = config.minutes * 60
    step, epoch, losses = 0, 0, []
    start = last_log = time.perf_counter()
    clock = torch.zeros(1, dtype=torch.float64)
    done = budget <= 0
    network.train()
    while not done:
        stream.set_epoch(epoch)
        for batch in datasource.stats.timed(loader):
            # every rank takes the slowest rank's clock, so all stop at the same step (DDP needs lockstep)
            clock[0] = time.perf_counter() - start
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            fraction = float(clock[0]) / budget
            if fraction >= 1:
                done = True
                break
            for group in optimiser.param_groups:  # a short warm-up, then polynomial decay over the time budget
                group["lr"] = config.learning_rate * min(1.0, 20 * fraction) * (1 - fraction) ** 0.9
            images = batch[defs.KEY_IMAGES].float()
            labels = batch[defs.KEY_LABELS][:, 0].long()
            loss = segmentation_loss(network(images), labels, class_weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
            now = time.perf_counter()
            if rank == 0 and now - last_log >= config.log_every_s:
                last_log = now
                recent = losses[-20:]
                log(
                    f"  step {step:5d}  epoch {epoch:3d}  {now - start:6.0f} s  loss {sum(recent) / len(recent):.3f}  "
                    f"lr {optimiser.param_groups[0]['lr']:.2e}  waiting for data "
                    f"{100 * datasource.stats.snapshot().wait_fraction:.0f}%"
                )
        epoch += 1
    seconds = time.perf_counter() - start
    snapshot = datasource.stats.snapshot()
    world = dist.get_world_size()
    result = {
        "steps": step,
        "epochs_started": epoch,
        "seconds": seconds,
        "patches": step * config.batch_size * world,
        "patches_per_second": step * config.batch_size * world / seconds if seconds else 0.0,
        "waiting_for_data": snapshot.wait_fraction,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else math.nan,
    }
    datasource.close()
    client.close()
    return result


def segment(config: Config, network: nn.Module, job_id: str, rank: int, world: int) -> dict[str, Any]:
    """Sliding-window inference of this rank's share of the held-out patches, posted to the shared assembly job; then
    the evaluation and export of this rank's share of the subjects, after which the job is deleted. Returns
    {"subjects": {name: figures}, "inference_s": seconds}."""
    client = pw.connect(config.address, credentials=config.credentials)
    datasource = inference_datasource(client, config)
    assembler = client.assembler(datasource, overlap="gaussian", job_id=job_id, entries={"probabilities": len(LABELS)})
    stream = PytorchStreamingDataset(datasource, batch_size=1, shard_balance="none")  # rank r: patches r, r + world..
    network.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(stream, batch_size=None):
            probabilities = network(batch[defs.KEY_IMAGES].float()).softmax(dim=1)
            # channel-last, as the assembler (like pymia's) expects; no last_batch: the other rank still posts
            assembler.add_batch({"probabilities": probabilities.movedim(1, -1)}, batch[defs.KEY_SAMPLE_INDEX])
    assembler.flush()
    inference_s = time.perf_counter() - start
    dist.barrier()  # every patch of every subject is with the server now

    names = {s.index: s.name for s in client.describe(config.dataset).subjects}
    label_extractor = extr.DataExtractor(categories=(defs.KEY_LABELS,))
    results = {}
    for subject in datasource.subjects[rank::world]:
        index = subject.subject_index
        name = names[index]
        arrays, properties = assembler.fetch(index)
        prediction = arrays["probabilities"].argmax(axis=-1).astype(np.uint8)
        truth = datasource.direct_extract(label_extractor, index)[defs.KEY_LABELS][..., 0]
        figures: dict[str, Any] = {"dice": dice_scores(prediction, truth), "patches": subject.sample_count}
        if config.export:
            out = Path(config.out)
            t = time.perf_counter()
            figures["probabilities"] = str(assembler.export(index, out / f"{name}_probabilities.nii.gz"))
            figures["export_s"] = time.perf_counter() - t
            written = write_segmentation(prediction, properties, out / f"{name}_segmentation.nii.gz")
            if written is not None:
                figures["segmentation"] = str(written)
        results[name] = figures
    dist.barrier()  # every rank has what it needs from the job: the server may free it
    if rank == 0:
        assembler.delete()
    assembler.close()
    datasource.close()
    client.close()
    return {"subjects": results, "inference_s": inference_s}


def write_segmentation(labels: np.ndarray, properties: Any, path: Path) -> Path | None:
    """Writes a label map with the subject's geometry (SimpleITK); None where SimpleITK is not installed."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    image = sitk.GetImageFromArray(labels)
    image.SetOrigin(properties.origin)
    image.SetSpacing(properties.spacing)
    image.SetDirection(properties.direction)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def run_rank(rank: int, world: int, config: Config, init_method: str) -> None:
    """One rank: joins the gloo group, trains, segments; rank 0 writes ``metrics.json`` and prints the figures."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
    )
    try:
        network = UNet3d(channels=config.channels, depth=config.depth)
        model = nn.parallel.DistributedDataParallel(network)
        if rank == 0:
            log(
                f"training {sum(p.numel() for p in network.parameters())} parameters on {world} ranks for "
                f"{config.minutes:g} min: {config.sampler} sampler, patches {config.patch}^3, batch "
                f"{config.batch_size} per rank, subjects {', '.join(config.train_subjects)}"
            )
        training = train(config, model, rank)
        if rank == 0:
            torch.save(network.state_dict(), Path(config.out, "model.pt"))
        job = [uuid.uuid4().hex[:12] if rank == 0 else ""]
        dist.broadcast_object_list(job, src=0)
        if rank == 0:
            log(
                f"trained {training['steps']} steps ({training['patches']} patches, "
                f"{training['patches_per_second']:.1f}/s) in {training['seconds']:.0f} s; segmenting "
                f"{', '.join(config.held_out)} (assembly job {job[0]})"
            )
        segmented = segment(config, network, job[0], rank, world)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"training": training, **segmented})
        if rank == 0:
            report(config, gathered)
    finally:
        dist.destroy_process_group()


def report(config: Config, gathered: Sequence[dict[str, Any]]) -> None:
    """Prints Dice per subject and label and writes ``metrics.json`` (rank 0)."""
    subjects: dict[str, Any] = {}
    for part in gathered:
        subjects.update(part["subjects"])
    names = LABELS[1:]
    log("Dice on held-out subjects:")
    log(f"  {'subject':<12}" + "".join(f"{n:>14}" for n in names))
    for name, figures in sorted(subjects.items()):
        log(f"  {name:<12}" + "".join(f"{figures['dice'][n]:14.3f}" for n in names))
    mean = {n: float(np.nanmean([s["dice"][n] for s in subjects.values()])) for n in names}
    log(f"  {'mean':<12}" + "".join(f"{mean[n]:14.3f}" for n in names))
    metrics = {
        "config": {k: v for k, v in asdict(config).items() if k != "credentials"},
        "training": gathered[0]["training"],
        "inference_s": max(part["inference_s"] for part in gathered),
        "subjects": subjects,
        "mean_dice": mean,
    }
    Path(config.out, "metrics.json").write_text(json.dumps(metrics, indent=2))


# -- the driver ------------------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds of each phase of the driver."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - start


@contextlib.contextmanager
def phantom_server(folder: Path, subjects: int, shape: tuple[int, int, int], seed: int) -> Iterator[str]:
    """Writes a phantom dataset into ``folder`` and serves it as 'phantom' from a child process; yields the address."""
    from patchwire.cli.launch import launch_server
    from patchwire.service._phantom import make_phantom_dataset

    path = folder / "phantom.h5"
    make_phantom_dataset(path, subjects=subjects, shape=shape, seed=seed)
    with launch_server({"phantom": path}, stderr=None) as server:
        yield server.address


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training time (default 10; 0: no training)")
    parser.add_argument(
        "--sampler", choices=("label", "uniform"), default="label", help="patch centres (default label)"
    )
    parser.add_argument(
        "--subjects", type=int, default=8, help="phantom subjects to generate (default 8; not with --address)"
    )
    parser.add_argument("--held-out", type=int, default=2, help="last subjects kept for evaluation (default 2)")
    parser.add_argument("--out", type=Path, default=Path("segmentation-out"), help="folder for the results")
    parser.add_argument("--address", help="use this running server (HOST:PORT) instead of starting one")
    parser.add_argument("--dataset", default="phantom", help="dataset on that server (default phantom)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(181, 217, 181),
        metavar=("Z", "Y", "X"),
        help="phantom image shape (default 181 217 181; not with --address)",
    )
    parser.add_argument("--ranks", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--patch", type=int, default=Config.patch, help="patch edge, a multiple of 2**(depth + 1)")
    parser.add_argument("--batch-size", type=int, default=Config.batch_size, help="patches per rank and step")
    parser.add_argument("--samples-per-volume", type=int, default=Config.samples_per_volume)
    parser.add_argument("--channels", type=int, default=Config.channels, help="U-Net channels at full resolution")
    parser.add_argument("--depth", type=int, default=Config.depth, help="U-Net downsamplings")
    parser.add_argument("--lr", type=float, default=Config.learning_rate, help="peak learning rate (AdamW)")
    parser.add_argument(
        "--small-weight", type=float, default=Config.small_weight, help="cross-entropy weight of labels 3-5"
    )
    parser.add_argument("--overlap", type=float, default=Config.overlap, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--no-augmentation", action="store_true", help="train on patches as they are")
    parser.add_argument("--no-export", action="store_true", help="write no NIfTI files")
    parser.add_argument("--seed", type=int, default=0)
    add_credential_flags(parser)  # for --address: --ca-cert, --token-file (or $PATCHWIRE_TOKEN), --client-cert ...
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.patch % 2 ** (args.depth + 1):
        print(
            f"--patch must be a multiple of {2 ** (args.depth + 1)} for a U-Net of depth {args.depth}", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun and args.address is None:
        print("under torchrun give --address: every rank must reach the same server", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="patchwire-train-")))
        address = args.address
        if address is None:
            with timings.phase("data and server"):
                log(f"writing {args.subjects} phantom subjects and starting a server")
                address = stack.enter_context(phantom_server(folder, args.subjects, tuple(args.shape), args.seed))
        credentials = pw.Credentials.from_args(args, os.environ) if args.address else pw.Credentials()
        with pw.connect(address, wait_for_server=True, credentials=credentials) as client:
            names = [s.name for s in client.describe(args.dataset).subjects]
        if not 0 < args.held_out < len(names):
            print(f"--held-out must leave subjects on both sides of {len(names)}", file=sys.stderr)
            return 2
        config = Config(
            address=address,
            dataset=args.dataset,
            train_subjects=tuple(names[: -args.held_out]),
            held_out=tuple(names[-args.held_out :]),
            out=str(args.out),
            sampler=args.sampler,
            minutes=args.minutes,
            patch=args.patch,
            batch_size=args.batch_size,
            samples_per_volume=args.samples_per_volume,
            channels=args.channels,
            depth=args.depth,
            learning_rate=args.lr,
            small_weight=args.small_weight,
            overlap=args.overlap,
            seed=args.seed,
            threads=args.threads,
            augment=not args.no_augmentation,
            export=not args.no_export,
            credentials=credentials,
        )
        with timings.phase("ranks"):
            if torchrun:
                run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config, "env://")
            else:
                init = f"file://{folder / 'rendezvous'}"
                if sys.platform.startswith("linux"):  # the spawned ranks share this machine: talk over loopback
                    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
                mp.spawn(run_rank, args=(args.ranks, config, init), nprocs=args.ranks, join=True)
    total = time.perf_counter() - start
    metrics_path = args.out / "metrics.json"
    if metrics_path.exists() and (not torchrun or os.environ["RANK"] == "0"):
        metrics = json.loads(metrics_path.read_text())
        metrics["timings"] = {**timings.phases, "total": total}
        metrics_path.write_text(json.dumps(metrics, indent=2))
        log(
            "timings: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in metrics["timings"].items())
            + f"; training {metrics['training']['seconds']:.0f} s, inference {metrics['inference_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
