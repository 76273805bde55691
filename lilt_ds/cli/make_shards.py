"""Convert caption JSON files in the original LilT format into tar shards (WebDataset layout), or
count existing local shards into sizes.json files (training opens no tar to count them):

lilt-make-shards --json train.json [more.json ...] --out DIR --shard-size 10000 [--image-root R]
lilt-make-shards --count "/data/{00000..00099}.tar"
"""

import json
import os

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", nargs="+", help="caption JSON files in the original format")
    source.add_argument(
        "--count",
        metavar="PATTERN",
        help="local shards (a brace pattern) to count from img2dataset's _stats.json or the tar headers, "
        "written into sizes.json beside them",
    )
    parser.add_argument("--out", help="folder to write the shards into (with --json)")
    parser.add_argument("--shard_size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--image_root", default=None, help="folder that relative image paths start from")
    parser.add_argument("--skip_missing", action="store_true", help="leave out entries whose image is missing")
    args = parser.parse_args(argv)

    if args.count:
        print(json.dumps(write_sizes(args.count), indent=1))
        return
    if not args.out:
        parser.error("--json needs --out (the folder to write the shards into)")
    from lilt_ds.data import write_shards

    print(json.dumps(write_shards(args.json, args.out, args.shard_size, args.image_root, args.skip_missing), indent=1))


def write_sizes(pattern: str) -> dict:
    """Count the shards of ``pattern`` and merge the counts into each folder's sizes.json."""
    from lilt_ds.data.shards.files import SIZES_FILE, count_shards
    from lilt_ds.fileio import atomic_path

    by_folder: dict[str, dict[str, int]] = {}
    for path, count in count_shards(pattern).items():
        by_folder.setdefault(os.path.dirname(os.path.abspath(path)), {})[os.path.basename(path)] = count
    for folder, counts in by_folder.items():
        listing = os.path.join(folder, SIZES_FILE)
        merged = {}
        if os.path.exists(listing):
            with open(listing, encoding="utf-8") as handle:
                merged = json.load(handle)
        merged.update(counts)
        with atomic_path(listing) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            json.dump(merged, handle, indent=1)
    return {
        "shards": sum(len(c) for c in by_folder.values()),
        "samples": sum(sum(c.values()) for c in by_folder.values()),
        "sizes_files": sorted(os.path.join(f, SIZES_FILE) for f in by_folder),
    }


def entry():
    """The ``lilt-make-shards`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
