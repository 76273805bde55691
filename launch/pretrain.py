"""`python launch/pretrain.py` = `python -m lilt_ds.cli.pretrain` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.pretrain import main

if __name__ == "__main__":
    run(main)
