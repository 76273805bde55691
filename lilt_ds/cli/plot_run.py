"""A run's curves (loss, learning rate, logit scale, samples/s, data wait, held-out recall) from its
steps.jsonl and results.jsonl, as one PNG; several runs are drawn on the same charts:

lilt-plot-run RUN_DIR [RUN_DIR ...] [--out FILE.png]
"""

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output_dir")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/curves.png for one run, curves.png else)")
    args = parser.parse_args(argv)

    import os

    from lilt_ds.tools.run_plots import plot_runs, read_run

    records = [read_run(folder) for folder in args.runs]
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    plot_runs(records, out)
    print(f"wrote {out}: {', '.join(r.name for r in records)}")


def entry():
    """The ``lilt-plot-run`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
