"""``python -m lilt_ds.ops --build``: build (or load from the cache) every fused op and report it."""

from __future__ import annotations

import argparse
import logging

import torch

from .builder import OPS, select


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lilt_ds.ops", description=__doc__)
    parser.add_argument("--build", action="store_true", help="build the kernels and report which implementation runs")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for op in OPS:
        selection = select(op, device_type)
        print(f"{op} on {device_type}: {selection.kind} -- {selection.description} ({selection.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
