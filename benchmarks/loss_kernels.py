"""Fused kernels vs their references: contrastive-loss time/peak memory, and saved activations with recompute.

Loss: forward+backward of ONE rank's share of a W=8 data-parallel step, simulated in one process:
B = N/8 local rows against N gathered rows, d=256, fp32, CPU threads as torch has them. Peak memory =
peak bytes of live tensors the loss creates (LiveTensorPeak of benchmarks/loss_memory.py; the fused
kernel's per-thread tiles, a few hundred KiB, are not tensors and not counted). local = the B x N
matrix loss (ContrastiveLoss(local_loss=True)), chunked = the PyTorch reference (chunk 1024).

Activations: bytes of non-parameter tensors autograd saves for backward (saved_tensors_hooks), per
sample, for lilt base/base (ln+adapters on both towers; --activation-size for other towers) with and
without memory.frozen_recompute, next to clip of the same towers; random init, fp32, batch 2 at 256 px
(--activation-image-size), text length 32. The time of one forward+backward (fastest of 3) shows
what the recompute costs.

Usage: python benchmarks/loss_kernels.py [--sizes 1k,4k,16k,32k] [--skip-local-above 16k] [--no-activations]
       [--activation-size base] [--activation-image-size 256]
"""

from __future__ import annotations

import argparse
import time

import loss_memory  # a sibling: the script's folder is first on sys.path
import torch
from loss_memory import LiveTensorPeak, format_bytes, forward_backward, parse_size

from lilt_ds.memory import SavedTensorMeter
from lilt_ds.models import apply_frozen_recompute
from lilt_ds.ops import FusedContrastiveLoss

WORLD, DIM, CHUNK = 8, 256, 1024


def make_loss(mode: str, chunk: int):
    """loss_memory's losses plus the fused one."""
    return FusedContrastiveLoss(local_loss=True) if mode == "fused" else _reference_make_loss(mode, chunk)


_reference_make_loss = loss_memory.make_loss
loss_memory.make_loss = make_loss  # forward_backward builds its loss through this name


def measure_loss(mode: str, n: int) -> tuple[int, float]:
    probe = LiveTensorPeak()
    seconds = forward_backward(mode, n, WORLD, DIM, CHUNK, "cpu", probes=[probe])
    return probe.stop(), seconds


def loss_table(sizes: list[int], skip_local_above: int) -> None:
    print(
        f"## contrastive loss, one rank of W={WORLD}: B=N/{WORLD} local rows vs N gathered, d={DIM}, fp32, "
        f"cpu, {torch.get_num_threads()} threads"
    )
    print("| N | B | mode | peak memory | % of local | time (s) | x local time |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        base = None
        for mode in ("local", "chunked", "fused"):
            if mode == "local" and n > skip_local_above:
                print(f"| {n} | {n // WORLD} | local | skipped (> --skip-local-above) | | | |")
                continue
            peak, seconds = measure_loss(mode, n)
            base = base or (peak, seconds)
            print(
                f"| {n} | {n // WORLD} | {mode} | {format_bytes(peak)} | {100 * peak / base[0]:.1f}% | "
                f"{seconds:.2f} | {seconds / base[1]:.2f}x |",
                flush=True,
            )


def saved_activation_bytes(model, batch) -> int:
    meter = SavedTensorMeter(model.parameters(), backward=False)
    with meter:
        image_emb, text_emb, scale = model(*batch)
    del image_emb, text_emb, scale
    return meter.bytes


def step_seconds(model, batch, repeats: int = 3) -> float:
    """Fastest of ``repeats`` forward+backward passes (a symmetric similarity loss on the embeddings)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        image_emb, text_emb, scale = model(*batch)
        (image_emb @ text_emb.T * scale).logsumexp(1).sum().backward()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return min(times)


def activation_table(size: str = "base", batch_size: int = 2, image_size: int = 256, text_len: int = 32) -> None:
    from lilt_ds.config import load_config
    from lilt_ds.models import build_model

    common = [
        f"vision_encoder={size}",
        f"text_encoder={size}",
        "model.vision.pretrained=false",
        "model.text.pretrained=false",
        f"image_size={image_size}",
    ]
    batch = (
        torch.randn(batch_size, 3, image_size, image_size),
        torch.randint(0, 1000, (batch_size, text_len)),
        torch.ones(batch_size, text_len, dtype=torch.long),
    )
    print(
        f"\n## saved activations per sample: {size}/{size}, random init, fp32, batch {batch_size}, {image_size} px, "
        f"{text_len} tokens"
    )
    print("| model | recompute | patched | saved per sample | x clip | fwd+bwd (s) | x clip time |")
    print("|---|---|---|---|---|---|---|")
    clip_bytes = clip_time = None
    for name, preset, recompute in (
        ("clip", "clip", False),
        ("lilt ln+adapters", "lilt", False),
        ("lilt ln+adapters", "lilt", True),
    ):
        extra = [] if preset == "clip" else ["model.vision.unlock=[ln,adapters]", "model.text.unlock=[ln,adapters]"]
        model = build_model(load_config(preset, common + extra), load_weights=False)
        patched = apply_frozen_recompute(model) if recompute else 0
        per_sample = saved_activation_bytes(model, batch) / batch_size
        seconds = step_seconds(model, batch)
        clip_bytes, clip_time = clip_bytes or per_sample, clip_time or seconds
        print(
            f"| {name} | {'yes' if recompute else 'no'} | {patched} | {format_bytes(per_sample)} | "
            f"{per_sample / clip_bytes:.2f}x | {seconds:.2f} | {seconds / clip_time:.2f}x |",
            flush=True,
        )
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1k,4k,16k,32k")
    parser.add_argument("--skip-local-above", default="32k", help="skip the B x N local loss above this N")
    parser.add_argument("--no-activations", action="store_true")
    parser.add_argument("--activation-size", default="base", help="tower preset of both towers in the activation table")
    parser.add_argument("--activation-image-size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    for mode in ("local", "chunked", "fused"):  # warm-up: thread pools, kernel build/load
        measure_loss(mode, 256)
    loss_table([parse_size(s) for s in args.sizes.split(",")], parse_size(args.skip_local_above))
    if not args.no_activations:
        activation_table(args.activation_size, image_size=args.activation_image_size)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
