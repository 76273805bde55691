"""Build (or load from the cache) every fused kernel for this machine's device and say which runs:

lilt-build-kernels
"""

import logging

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.parse_args(argv)

    import torch

    from lilt_ds.ops.builder import OPS, select

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for op in OPS:
        selection = select(op, device_type)
        print(f"{op} on {device_type}: {selection.kind} -- {selection.description} ({selection.seconds:.1f} s)")
    return 0


def entry():
    """The ``lilt-build-kernels`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
