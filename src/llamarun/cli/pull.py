"""`llamarun pull NAME`: download a catalogue model into the cache (see llamarun.catalogue)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..catalogue import CATALOGUE

    parser.add_argument("name", metavar="NAME", help=f"catalogue name: {', '.join(CATALOGUE)}")
    parser.add_argument(
        "--mirror",
        default=None,
        help="fetch from URL/FILENAME instead (http(s):// or file://; also LLAMARUN_MIRROR)",
    )


def run(args: argparse.Namespace) -> int:
    from ..catalogue import cached_path, pull

    already = cached_path(args.name)
    path = already or pull(args.name, mirror=args.mirror)
    print(f"{args.name}: {'already cached at' if already else 'saved to'} {path}")
    return 0
