"""Zero-shot retrieval and classification of a checkpoint, an export, or the untrained base towers
(or pretrained pair) of a config, on one or several datasets; one table, CLIP_benchmark's files.

lilt-evaluate --checkpoint outputs/run --datasets imagenet=/d/imagenet/val cifar10=/d/cifar-10-batches-py \
    coco=/d/coco_test.json --output_dir outputs/run/eval
lilt-evaluate --checkpoint outputs/run --task retrieval --data eval.json --image_root DIR   (one dataset)
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
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="datasets to evaluate: imagenet (synset folders), cifar10/cifar100 (the python pickles' folder), "
        "coco/flickr30k (Karpathy-split JSON), classification (class folders or JSON), retrieval (JSON); "
        "NAME:LABEL=PATH for a second set of a kind",
    )
    parser.add_argument("--task", choices=("retrieval", "classification"), help="one dataset: its task (with --data)")
    parser.add_argument("--data", help="one dataset: retrieval JSON; classification folder, CIFAR pickles or JSON")
    parser.add_argument("--image_root", default=None, help="relative image paths (default: the JSON's folder)")
    parser.add_argument(
        "--classnames",
        default=None,
        help="file with one class name per line (JSON with int labels; replaces folder names), or imagenet",
    )
    parser.add_argument(
        "--templates",
        default=None,
        help="a template, a file of templates, imagenet (80) or cifar (18); default: each dataset's "
        "(imagenet's, cifar's; 'a photo of a {}.' else)",
    )
    parser.add_argument("--output_dir", default=None, help="--datasets: results.jsonl and clip_benchmark/*.json here")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--workers",
        default="auto",
        type=workers,
        help="DataLoader workers per rank for the images (auto: none on the CPU; on a GPU as data.num_workers=auto)",
    )
    parser.add_argument(
        "--output", default=None, help="one dataset: JSON file of its metrics (default outputs/eval-<task>-<time>.json)"
    )
    args = parser.parse_args(argv)
    if (args.datasets is None) == (args.task is None or args.data is None):
        parser.error("give --datasets NAME=PATH ..., or one dataset as --task T --data PATH")

    from lilt_ds.evaluate import evaluate_datasets, run_evaluation

    if args.datasets is None:
        templates = args.templates or "a photo of a {}."
        run_evaluation(
            args.task,
            args.data,
            args.checkpoint,
            args.config,
            args.overrides,
            args.image_root,
            args.classnames,
            templates,
            args.batch_size,
            args.workers,
            args.output,
        )
        return
    evaluate_datasets(
        args.datasets,
        args.checkpoint,
        args.config,
        args.overrides,
        args.image_root,
        args.classnames,
        args.templates or "auto",
        args.batch_size,
        args.workers,
        args.output_dir,
    )


def entry():
    """The ``lilt-evaluate`` console script."""
    run(main)


if __name__ == "__main__":
    run(main)
