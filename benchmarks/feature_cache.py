"""What the locked-tower feature cache buys LiT: samples/s of whole epochs, data loading included,
with and without ``data.cache_locked_features``, in one run; and what the cache costs to build and store.

    python benchmarks/feature_cache.py [--size small] [--image-size 224] [--batch 16] [--images 256]
        [--image-pixels 256] [--rounds 2] [--workers 2] [--output FILE.md]

Both runs are our trainer (``Trainer`` under ``ds_configs/zero2.json``, precision the config's choice for
the device) of the same LiT model (``--size``/``--size`` DeiT + BERT presets, random weights) on the
same demo dataset of ``--images`` JPEG files of ``--image-pixels`` px, read by the real training loader
(``--workers`` DataLoader workers). Without the cache every epoch decodes, resizes and runs the locked
image tower; with it (``cache_views=1``, the eval resize, compared against ``data.augment.preset=none``,
the same pixels) the tower runs once per image when the run starts, and every epoch reads its rows.
The first epoch of each is warm-up (worker start); then ``--rounds`` epochs each, alternating between
the two runs so machine noise hits them alike; the median epoch is reported.
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def epoch_seconds(trainer, epoch: int) -> float:
    """One whole epoch of the trainer's loop (loader included), in seconds."""

    trainer.epoch = epoch
    start = time.perf_counter()
    for batch in trainer.loader:
        trainer.optimizer_step([trainer.to_device(batch)])
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="tower preset of both towers")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=256, help="demo images (one epoch)")
    parser.add_argument("--image-pixels", type=int, default=256, help="side of the demo JPEG files")
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs of each run")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--output", default=os.path.join("outputs", "benchmarks", "feature_cache.md"))
    args = parser.parse_args()

    from step_runners import benchmark_config  # a sibling

    from lilt_ds.allocator import retain_freed_memory
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.schema import replace_keys
    from lilt_ds.train import Trainer

    retain_freed_memory()  # as our trainer does on the CPU
    scratch = tempfile.mkdtemp(prefix="lilt-feature-cache-")
    os.environ["LILT_DS_CACHE"] = os.path.join(scratch, "cache")  # a fresh demo set and cache
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    demo = {"n": args.images, "eval_n": 8, "seed": 0, "size": args.image_pixels}
    variants = {"images": ["data.augment.preset=none"], "cached": ["data.cache_locked_features=true"]}
    trainers, built = {}, {}
    try:
        with process_group_scope():
            for name, extra in variants.items():
                cfg = benchmark_config(
                    args.size,
                    "lit",
                    args.image_size,
                    args.batch,
                    workers=args.workers,
                    demo=demo,
                    total_steps=10**6,
                    extra=extra,
                )
                cfg = replace_keys(cfg, {"output_dir": os.path.join(scratch, name)})
                start = time.perf_counter()
                trainers[name] = Trainer(cfg, ds, quiet=True)
                built[name] = time.perf_counter() - start
            for trainer in trainers.values():
                epoch_seconds(trainer, 0)  # warm-up: workers start, caches fill
            seconds = {name: [] for name in trainers}
            for epoch in range(1, args.rounds + 1):
                for name, trainer in trainers.items():
                    seconds[name].append(epoch_seconds(trainer, epoch))
            cache = trainers["cached"].feature_cache
            samples = trainers["cached"].loader.batches_per_epoch * args.batch
            width = trainers["cached"].model.vision.width
            precision = str(trainers["cached"].dtype).replace("torch.", "")
            for trainer in trainers.values():
                trainer.engine.destroy()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    per_image = cache["seconds"] / args.images
    row_bytes = width * 4 + 1  # fp32 row + its status byte, per view
    lines = [
        f"# LiT {args.size}/{args.size}, {args.image_size} px, batch {args.batch}, ZeRO-2, {args.images} JPEG "
        f"images of {args.image_pixels} px, {args.workers} workers, {precision}, "
        f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| run | epoch (s), median of " + str(args.rounds) + " | samples/s | x without |",
        "|---|---:|---:|---:|",
    ]
    for name in trainers:
        lines.append(
            f"| {'with the feature cache' if name == 'cached' else 'without (images)'} | "
            f"{statistics.median(seconds[name]):.2f} | {rate[name]:.1f} | {rate[name] / rate['images']:.2f} |"
        )
    lines += [
        "",
        "| cache | value |",
        "|---|---:|",
        f"| build, {args.images} images (s) | {cache['seconds']:.2f} |",
        f"| build per million images, this machine (h) | {per_image * 1e6 / 3600:.1f} |",
        f"| size per million images and view (GB) | {row_bytes * 1e6 / 1e9:.2f} |",
        f"| row width (fp32 values) | {width} |",
        f"| set-up of the run without the cache (s) | {built['images']:.2f} |",
        f"| set-up of the run with it, build included (s) | {built['cached']:.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
