"""`python launch/export.py` = `python -m lilt_ds.cli.export` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.export import main

if __name__ == "__main__":
    run(main)
