"""`python launch/evaluate.py` = `python -m lilt_ds.cli.evaluate` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.evaluate import main

if __name__ == "__main__":
    run(main)
