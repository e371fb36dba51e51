"""``patchwire serve``'s limit flags: one per field of :class:`~patchwire.service._limits.Limits`, setting
``limits.<field>`` when given (:func:`~patchwire.cli._setting_flags.setting_flag`), with the field's docstring as its
help and its default; MB flags converted to bytes."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from patchwire.cli._setting_flags import setting_flag
from patchwire.service._limits import Limits

__all__ = ["add_limit_flags", "limits_from_args"]

_MiB = 1 << 20

_FLAGS: dict[str, tuple[str, int]] = {
    # field -> (flag, unit: 1 for counts, _MiB for the -mb flags)
    "max_calls_per_identity": ("--max-calls-per-identity", 1),
    "max_calls": ("--max-calls", 1),
    "max_jobs_per_identity": ("--max-jobs-per-identity", 1),
    "max_jobs": ("--max-jobs", 1),
    "max_job_disk_bytes": ("--max-job-disk-mb", _MiB),
    "max_disk_bytes": ("--max-disk-mb", _MiB),
    "max_post_bytes": ("--max-post-mb", _MiB),
    "max_sample_bytes": ("--max-sample-mb", _MiB),
    "max_batch_size": ("--max-batch-size", 1),
    "max_batch_bytes": ("--max-batch-mb", _MiB),
    "max_indices": ("--max-indices", 1),
    "max_subjects": ("--max-subjects", 1),
    "max_epoch_samples": ("--max-epoch-samples", 1),
    "max_spec_depth": ("--max-spec-depth", 1),
    "max_repeated": ("--max-repeated", 1),
}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One ``patchwire serve`` flag per field of :class:`Limits`, setting ``limits.<field>`` when given."""
    group = parser.add_argument_group(
        "limits", "requests over a limit get RESOURCE_EXHAUSTED naming the flag ([limits] in --config)"
    )
    docs = _field_docs()
    for name, (flag, unit) in _FLAGS.items():
        setting_flag(
            group,
            flag,
            key=f"limits.{name}",
            unit=unit,
            type=_positive(float, unit) if unit != 1 else _positive(int),
            metavar="MB" if unit != 1 else "N",
            help=docs.get(name, ""),
        )


def _positive(kind: Callable[[str], float], unit: int = 1) -> Callable[[str], int]:
    """An argparse type: a positive number of ``unit`` as a whole count (at least 1: 0.1 byte is one)."""

    def parse(text: str) -> int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return max(1, int(value * unit))

    return parse


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` of parsed ``patchwire serve`` flags alone (the defaults for those not given)."""
    given = vars(args)
    return Limits(**{name: given[f"limits.{name}"] for name in _FLAGS if f"limits.{name}" in given})


def _field_docs() -> dict[str, str]:
    """Each field's docstring, without its flag (for --help)."""
    from patchwire.service._settings import attribute_docs

    docs: dict[str, str] = {}
    for name, text in attribute_docs(Limits).items():
        text = re.sub(r"\s*\(--[a-z-]+\)|;\s*--[a-z-]+", "", text).rstrip(".")
        docs[name] = text.replace("%", "%%")
    return docs
