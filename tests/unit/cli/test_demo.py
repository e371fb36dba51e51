"""``patchwire demo``'s arguments (the demo itself runs against a real server in the seed pipeline tests)."""

from __future__ import annotations

from pathlib import Path

from patchwire.cli import build_parser


def test_defaults_start_a_server_on_the_phantom_dataset() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.address, args.dataset, args.batch_size, args.workers, args.no_progress) == (
        None,
        "phantom",
        2,
        0,
        False,
    )
    assert (args.token_file, args.ca_cert, args.tls) == (None, None, False)


def test_flags() -> None:
    args = build_parser().parse_args(
        ["demo", "--address", "h:1", "--dataset", "brains", "--batch-size", "4", "--workers", "2", "--no-progress",
         "--ca-cert", "ca.pem", "--token-file", "t"]
    )  # fmt: skip
    assert (args.address, args.dataset, args.batch_size, args.workers, args.no_progress) == (
        "h:1",
        "brains",
        4,
        2,
        True,
    )
    assert (args.ca_cert, args.token_file) == (Path("ca.pem"), Path("t"))
