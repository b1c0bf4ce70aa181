"""`llamarun list`: the cached catalogue models with their sizes (`--all`: the whole catalogue)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--all", action="store_true", help="also list catalogue models that are not cached"
    )


def run(args: argparse.Namespace) -> int:
    from ..catalogue import CATALOGUE, cached, home

    have = {name: (path, size) for name, path, size in cached()}
    rows = []
    for name, entry in CATALOGUE.items():
        if name in have:
            path, size = have[name]
            rows.append((name, _human(size), str(path)))
        elif args.all:
            size = entry.files[0].size
            rows.append((name, _human(size) if size else "?", f"not cached: {entry.description}"))
    if not rows:
        print(
            f"No models cached in {home() / 'models'}. `llamarun pull NAME` fetches one; `llamarun list --all` shows the catalogue."
        )
        return 0
    width = max(len(r[0]) for r in rows)
    for name, size, where in rows:
        print(f"{name:<{width}}  {size:>9}  {where}")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
