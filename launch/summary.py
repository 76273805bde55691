"""`python launch/summary.py` = `python -m lilt_ds.cli.summary` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.summary import main

if __name__ == "__main__":
    run(main)
