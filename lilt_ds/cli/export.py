"""Export a run's trained weights: a small safetensors file that, with the named base towers, is the model;
or, for a run started from a pretrained pair (model.init_from), a folder OpenCLIP or transformers load.

    lilt-export --checkpoint outputs/run --out run.safetensors [--full]
    lilt-export --checkpoint outputs/run --format open_clip --out exported/
    lilt-export --checkpoint outputs/run --format hf --out exported/
"""

import os

from lilt_ds.cli import ArgumentParser, run


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run folder, its checkpoints folder, one stepN folder "
        "(or, for --format open_clip/hf, a lilt_ds .safetensors export)",
    )
    parser.add_argument("--out", required=True, help="output .safetensors file (lilt_ds) or folder (open_clip, hf)")
    parser.add_argument(
        "--format",
        default="lilt_ds",
        choices=("lilt_ds", "open_clip", "hf"),
        help="lilt_ds: trainable weights (or --full); open_clip / hf: the pair's own model folder",
    )
    parser.add_argument(
        "--full", action="store_true", help="lilt_ds: write the whole model (frozen weights too) in fp32"
    )
    args = parser.parse_args(argv)

    if args.format != "lilt_ds":
        from lilt_ds.export_formats import export_pretrained_format

        if args.full:
            parser.error("--full belongs to --format lilt_ds (open_clip and hf folders always hold the whole model)")
        path = export_pretrained_format(args.checkpoint, args.out, args.format)
        print(f"wrote {path}: {', '.join(sorted(os.listdir(path)))}")
        return

    from lilt_ds.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, args.full)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


def entry():
    """The ``lilt-export`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
