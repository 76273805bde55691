"""Write the built-in demo dataset (coloured shapes with compositional captions) to a folder:

lilt-make-demo --out DIR [--n 5000 --eval_n 500 --seed 0 --size 128]
"""

import json

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument("--n", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--eval_n", type=int, default=500, help="held-out retrieval images (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    args = parser.parse_args(argv)
    for name in ("n", "eval_n", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")

    from lilt_ds.data import generate_demo

    print(json.dumps(generate_demo(args.out, n=args.n, eval_n=args.eval_n, seed=args.seed, size=args.size), indent=1))


def entry():
    """The ``lilt-make-demo`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
