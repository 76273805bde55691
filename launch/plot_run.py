"""`python launch/plot_run.py` = `python -m lilt_ds.cli.plot_run` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.plot_run import main

if __name__ == "__main__":
    run(main)
