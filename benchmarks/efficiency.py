"""What patch dropout and compiled towers buy: our trainer's steps with and without each, in one run.

    python benchmarks/efficiency.py [--size small] [--image-size 224] [--batch 16] [--warmup 3]
        [--steps 8] [--patch-dropout 0.5] [--compile inductor] [--skip-compile] [--output FILE.md]

Every variant is our trainer (``Trainer.optimizer_step`` under ``ds_configs/zero2.json``, bf16 where the
device runs it) of the same clip model (``--size``/``--size`` DeiT + BERT presets, random weights),
built together and stepped in turn on one synthetic batch, one step each round after round (as
``benchmarks/throughput.py`` does), so machine noise hits them alike:

- ``eager``: the baseline;
- ``patch_dropout``: ``model.vision.patch_dropout=P`` (each sample keeps a random 1 - P of its patches);
- ``compiled``: ``train.compile=BACKEND`` (both trunks through torch.compile inside the engine). Its
  first step holds the compilation, reported separately; the median is of the steps after warm-up.

Also printed: saved activations per sample (``lilt_ds.memory.estimate.profile_activations``, the
estimator's own measurement) of the whole clip model and of its vision tower alone (clip minus LiT,
whose locked image tower keeps nothing), with and without patch dropout.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="tower preset of both towers")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--patch-dropout", type=float, default=0.5)
    parser.add_argument("--compile", default="inductor", help="torch.compile backend of the compiled variant")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--output", default=os.path.join("outputs", "benchmarks", "efficiency.md"))
    args = parser.parse_args(argv)

    from step_runners import OursStep, benchmark_config, synthetic_batch, time_interleaved  # a sibling

    from lilt_ds.allocator import retain_freed_memory
    from lilt_ds.memory.estimate import profile_activations
    from lilt_ds.runtime import process_group_scope

    retain_freed_memory()  # as our trainer does on the CPU
    ds = os.path.join(ROOT, "ds_configs", "zero2.json")
    variants = {"eager": [], "patch_dropout": [f"model.vision.patch_dropout={args.patch_dropout}"]}
    if not args.skip_compile:
        variants["compiled"] = [f"train.compile={args.compile}"]
    lines = [
        f"# our trainer, clip {args.size}/{args.size}, {args.image_size} px, batch {args.batch}, ZeRO-2 "
        "(precision: the shipped config's choice for this device), "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
    ]
    with process_group_scope():
        cfgs = {
            name: benchmark_config(args.size, "clip", args.image_size, args.batch, extra=extra)
            for name, extra in variants.items()
        }
        runners, first = {}, {}
        batch = synthetic_batch(cfgs["eager"], args.batch)
        for name, cfg in cfgs.items():
            runners[name] = OursStep(cfg, ds)
            start = time.perf_counter()
            runners[name].step(batch)  # the first step: compilation, where there is one
            first[name] = time.perf_counter() - start
        times, errors = time_interleaved(runners, batch, args.warmup, args.steps)
        for runner in runners.values():
            runner.close()
    base = times["eager"].median
    lines += ["| variant | first step (s) | median step (s) | samples/s | x eager |", "|---|---:|---:|---:|---:|"]
    for name in variants:
        if name in errors:
            lines.append(f"| {name} | {first[name]:.2f} | failed: {errors[name]} | | |")
            continue
        median = times[name].median
        lines.append(
            f"| {name} | {first[name]:.2f} | {median:.3f} | {args.batch / median:.1f} | {base / median:.2f}x |"
        )

    dtype = torch.bfloat16  # as the memory estimator measures

    def per_sample(mode, extra=()):
        cfg = benchmark_config(args.size, mode, args.image_size, args.batch, extra=list(extra))
        return profile_activations(cfg, dtype, probe_batch=2).bytes_per_sample()

    dropped = [f"model.vision.patch_dropout={args.patch_dropout}"]
    clip, clip_pd, text_only = per_sample("clip"), per_sample("clip", dropped), per_sample("lit")
    vision, vision_pd = clip - text_only, clip_pd - text_only
    mib = 2**20
    lines += [
        "",
        f"saved activations per sample ({dtype}, probe batch 2):",
        "",
        "| | no dropout | patch dropout | ratio |",
        "|---|---:|---:|---:|",
        f"| clip model | {clip / mib:.2f} MiB | {clip_pd / mib:.2f} MiB | {clip_pd / clip:.2f}x |",
        f"| vision tower | {vision / mib:.2f} MiB | {vision_pd / mib:.2f} MiB | {vision_pd / vision:.2f}x |",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    from lilt_ds.cli import run

    run(main)
