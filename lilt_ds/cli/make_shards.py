"""Convert caption JSON files in the original LilT format into tar shards (WebDataset layout):

lilt-make-shards --json train.json [more.json ...] --out DIR --shard-size 10000 [--image-root R]
"""

import json

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--json", nargs="+", required=True, help="caption JSON files in the original format")
    parser.add_argument("--out", required=True, help="folder to write the shards into")
    parser.add_argument("--shard_size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--image_root", default=None, help="folder that relative image paths start from")
    parser.add_argument("--skip_missing", action="store_true", help="leave out entries whose image is missing")
    args = parser.parse_args(argv)

    from lilt_ds.data import write_shards

    print(json.dumps(write_shards(args.json, args.out, args.shard_size, args.image_root, args.skip_missing), indent=1))


def entry():
    """The ``lilt-make-shards`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
