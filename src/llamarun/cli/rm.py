"""`llamarun rm NAME`: delete a cached catalogue model."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", metavar="NAME", help="catalogue name of a cached model (see `llamarun list`)"
    )


def run(args: argparse.Namespace) -> int:
    from ..catalogue import remove

    folder = remove(args.name)
    print(f"removed {args.name} ({folder})")
    return 0
