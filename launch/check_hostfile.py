"""`python launch/check_hostfile.py` = `python -m lilt_ds.cli.check_hostfile` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.check_hostfile import main

if __name__ == "__main__":
    run(main)
