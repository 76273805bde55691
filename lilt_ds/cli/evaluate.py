"""Zero-shot retrieval or classification of a checkpoint, an export or the untrained base towers.

lilt-evaluate --checkpoint outputs/run --task retrieval --data eval.json --image_root DIR
lilt-evaluate --checkpoint run.safetensors --task classification --data imagenet/val --templates imagenet
deepspeed --num_gpus 2 --module lilt_ds.cli.evaluate ...      (each rank encodes a shard; same numbers)
"""

import argparse

from lilt_ds.cli import ArgumentParser, run


def workers(text: str):
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a number of DataLoader workers (0: none)")
    return text if text == "auto" else int(text)


def main(argv=None):
    parser = ArgumentParser(description=__doc__, launcher=True)
    parser.add_argument(
        "--checkpoint",
        help="run folder, checkpoint folder or exported .safetensors; "
        "without it, the untrained base towers of --config (a baseline)",
    )
    parser.add_argument("--config", default=None, help="preset or YAML (baseline; with --checkpoint it must match)")
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--task", choices=("retrieval", "classification"), required=True)
    parser.add_argument("--data", required=True, help="retrieval JSON; classification folder or JSON")
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--classnames", default=None, help="file with one class name per line (JSON with int labels)")
    parser.add_argument(
        "--templates", default="a photo of a {}.", help="a template, a file of templates, or 'imagenet' (80 prompts)"
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--workers",
        default="auto",
        type=workers,
        help="DataLoader workers per rank for the images (auto: none on the CPU; on a GPU as data.num_workers=auto)",
    )
    parser.add_argument(
        "--output", default=None, help="JSON file for the metrics (default outputs/eval-<task>-<time>.json)"
    )
    args = parser.parse_args(argv)

    from lilt_ds.evaluate import run_evaluation

    run_evaluation(
        args.task,
        args.data,
        args.checkpoint,
        args.config,
        args.overrides,
        args.image_root,
        args.classnames,
        args.templates,
        args.batch_size,
        args.workers,
        args.output,
    )


def entry():
    """The ``lilt-evaluate`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
