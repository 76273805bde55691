"""Export a run's trained weights: a small safetensors file that, with the named base towers, is the model.

    python launch/export.py --checkpoint outputs/run --out run.safetensors [--full]
"""

import os

from _cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="run folder, its checkpoints folder, or one stepN folder")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--full", action="store_true", help="write the whole model (frozen weights too) in fp32")
    args = parser.parse_args(argv)

    from lilt_ds.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, args.full)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run(main)
