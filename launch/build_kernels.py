"""`python launch/build_kernels.py` = `python -m lilt_ds.cli.build_kernels` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.build_kernels import main

if __name__ == "__main__":
    run(main)
