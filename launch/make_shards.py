"""`python launch/make_shards.py` = `python -m lilt_ds.cli.make_shards` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.make_shards import main

if __name__ == "__main__":
    run(main)
