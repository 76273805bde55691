"""Per-GPU memory of the LilT paper's setting for every mode and ZeRO config: the README's memory section.

    python benchmarks/memory.py [--sizes base large] [--world-size 4] [--micro-batch 128]
                                [--gpu-memory 32GB] [--probe-batch 2] [--output_dir outputs/benchmarks/memory]

Towers base/base and large/large at 256 px, text length 25, bf16; modes clip, lit and lilt (LayerNorm,
BitFit, LayerNorm + adapters, LoRA) with and without activation checkpointing; ds_configs zero0..3 and
the CPU offload ones. Activations are measured once per (towers, mode, checkpointing) by one forward
pass on this machine's device (its GPU if it has one) and reused across ds_configs (see lilt_ds.memory).
Prints the Markdown section and
writes it with CSV tables and PNG charts to --output_dir.
"""

import argparse
import os
import platform
import sys
import time

import torch

from lilt_ds.config import load_config
from lilt_ds.engine import load_ds_config
from lilt_ds.memory import (
    GIB,
    MIB,
    MemoryModel,
    ParameterInventory,
    activation_device,
    describe_model,
    parse_memory_size,
    profile_activations,
    usable_bytes,
)
from lilt_ds.models import build_model
from lilt_ds.tools.memory_report import (
    estimate_rows,
    estimate_table,
    plot_estimates,
    plot_micro_batch_curves,
    write_csv,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("clip", "lit", "lilt_ln", "lilt_bitfit", "lilt", "lilt_lora")
DS_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def experiment_config(preset: str, size: str, checkpointing: bool):
    """The preset at the paper's resolution with random towers of ``size``; checkpointing where a tower trains."""
    overrides = [
        f"vision_encoder={size}",
        f"text_encoder={size}",
        "image_size=256",
        "model.vision.pretrained=false",
        "model.text.pretrained=false",
    ]
    if checkpointing:
        overrides.append("model.text.grad_checkpointing=true")
        if preset != "lit":  # LiT's image tower is fully locked: it keeps no activations to checkpoint
            overrides.append("model.vision.grad_checkpointing=true")
    return load_config(preset, overrides)


def estimates_for(cfg, ds_configs: dict, args, budget: int):
    """Activations measured once for the experiment config, then per ds_config the estimate at the micro
    batch and the GiB per GPU at each of ``args.curve_batches``."""
    activations = profile_activations(cfg, torch.bfloat16, args.probe_batch)
    inventory = ParameterInventory.of(build_model(cfg, load_weights=False, device="meta"))
    models = {
        name: MemoryModel(cfg, ds, args.world_size, activations=activations, inventory=inventory)
        for name, ds in ds_configs.items()
    }
    curves = {
        name: [(batch, model.estimate(batch).gpu_total / GIB) for batch in args.curve_batches]
        for name, model in models.items()
    }
    return activations, [model.estimate(args.micro_batch, budget) for model in models.values()], curves


def summary_cell(estimate) -> str:
    """``11.6 (337)``: GiB per GPU at the micro batch, the largest micro batch that fits; ✗ when it does not."""
    return f"{estimate.gpu_total / GIB:.1f}{'' if estimate.fits else ' ✗'} ({estimate.largest_micro_batch})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["base", "large"])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=128)
    parser.add_argument("--gpu-memory", default="32GB")
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--probe-batch", type=int, default=2)
    parser.add_argument("--curve-batches", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--output_dir", default=os.path.join("outputs", "benchmarks", "memory"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.output_dir, exist_ok=True)
    budget = usable_bytes(parse_memory_size(args.gpu_memory), args.headroom)
    ds_configs = {name: load_ds_config(os.path.join(ROOT, "ds_configs", f"{name}.json")) for name in DS_CONFIGS}
    start = time.perf_counter()
    device = activation_device()
    where = (
        f"a CPU ({platform.processor() or platform.machine()})"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )

    section = [
        "## Memory per GPU",
        "",
        "`python benchmarks/memory.py" + "".join(f" {a}" for a in sys.argv[1:]) + "`",
        "",
        f"{args.world_size} GPUs, micro batch {args.micro_batch} per GPU "
        f"(global {args.world_size * args.micro_batch}), "
        f'256 px, text length 25, AdamW; the configs\' "auto" choices as on a GPU of compute capability 8.0+ '
        f"(bf16, overlap_comm on). Model states follow DeepSpeed 0.19's layout per ds_config; "
        f"activations are the bytes autograd saves, measured by a forward pass at batch {args.probe_batch} on "
        f"{where} and scaled. A config fits when its estimate stays "
        f"under {budget / GIB:.1f} GiB ({args.gpu_memory} less {args.headroom:.0%} headroom).",
        "",
    ]
    per_sample = ["| towers | model | checkpointing | MiB per sample | under ZeRO-3 |", "|---|---|---|---|---|"]
    csv_rows = []
    for size in args.sizes:
        summary = ["| model | ckpt | " + " | ".join(DS_CONFIGS) + " |", "|---|---|" + "---|" * len(DS_CONFIGS)]
        for checkpointing in (False, True):
            ckpt = "yes" if checkpointing else "no"
            estimates, by_micro_batch = [], {name: {} for name in DS_CONFIGS}
            for preset in PRESETS:
                cfg = experiment_config(preset, size, checkpointing)
                activations, by_ds_config, curves = estimates_for(cfg, ds_configs, args, budget)
                estimates += by_ds_config
                model = describe_model(cfg)
                for name, points in curves.items():
                    by_micro_batch[name][model] = points
                per_sample.append(
                    f"| {size}/{size} | {model} | {ckpt} | {activations.bytes_per_sample() / MIB:.1f} "
                    f"| {activations.bytes_per_sample(zero3_linear=True) / MIB:.1f} |"
                )
                summary.append(f"| {model} | {ckpt} | " + " | ".join(map(summary_cell, by_ds_config)) + " |")
                print(
                    f"{size} {model} ckpt={ckpt}: {activations.bytes_per_sample() / MIB:.1f} MiB/sample "
                    f"({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            title = (
                f"{size}/{size}, 256 px, {args.world_size} GPUs x {args.micro_batch}, "
                f"{'with' if checkpointing else 'without'} activation checkpointing: GiB per GPU"
            )
            stem = os.path.join(args.output_dir, f"{size}-{'ckpt' if checkpointing else 'no-ckpt'}")
            with open(f"{stem}.md", "w") as f:
                f.write(f"{title}\n\n{estimate_table(estimates)}\n")
            plot_estimates(estimates, f"{stem}.png", title)
            plot_micro_batch_curves(
                by_micro_batch,
                budget / GIB,
                f"{stem}-by-micro-batch.png",
                f"{size}/{size}, 256 px, {args.world_size} GPUs, {'with' if checkpointing else 'without'} activation "
                f"checkpointing: GiB per GPU against the micro batch; dashed: {args.gpu_memory} less headroom",
            )
            csv_rows += [{"towers": f"{size}/{size}", **row} for row in estimate_rows(estimates)]
            if not checkpointing:
                zero2 = [e for e in estimates if e.settings.stage == 2 and e.settings.offload_optimizer == "none"]
                section += [
                    f"### {size}/{size}: by category, ZeRO-2, no checkpointing (GiB per GPU)",
                    "",
                    estimate_table(zero2),
                    "",
                ]
        section += [
            f"### {size}/{size}: GiB per GPU at micro batch {args.micro_batch} "
            f"(largest micro batch that fits {args.gpu_memory}); ✗ = does not fit",
            "",
            *summary,
            "",
        ]
    section += [
        "### Saved activations per sample",
        "",
        *per_sample,
        "",
        "ZeRO-3 replaces `F.linear` by a function that keeps every linear layer's input, frozen layers "
        "included (`zero_optimization.memory_efficient_linear`, on by default); plain autograd keeps the "
        "input only when the weight trains. Frozen towers that still backpropagate (LilT) pay for it.",
        "",
        f"Charts and tables by category: `{args.output_dir}/*.png` (`*-by-micro-batch.png`: GiB per GPU "
        f"against the micro batch, a panel per ds_config, a line per model), `*.md`, `memory.csv`. "
        f"Benchmark time: {time.perf_counter() - start:.0f} s.",
        "",
    ]
    write_csv(csv_rows, os.path.join(args.output_dir, "memory.csv"))
    text = "\n".join(section)
    with open(os.path.join(args.output_dir, "README_section.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
