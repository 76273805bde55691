"""`python launch/make_demo.py` = `python -m lilt_ds.cli.make_demo` (kept for the documented commands)."""

from lilt_ds.cli import run
from lilt_ds.cli.make_demo import main

if __name__ == "__main__":
    run(main)
