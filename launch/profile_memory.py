"""`python launch/profile_memory.py` = `python -m lilt_ds.cli.profile_memory` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.profile_memory import main

if __name__ == "__main__":
    run(main)
