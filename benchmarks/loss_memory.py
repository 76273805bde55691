"""Peak memory and time of one rank's contrastive-loss forward+backward at large global batches.

Simulates W data-parallel ranks in one process: rank 0's share is B = N/W local rows against the N
gathered rows (no communication; the collectives' buffers are not counted). Compares
  global  - ContrastiveLoss(local_loss=False): N x N logits on every rank,
  local   - ContrastiveLoss(local_loss=True):  two B x N logit matrices,
  chunked - ChunkedContrastiveLoss(local_loss=True): chunk x chunk blocks, recomputed in backward,
  siglip  - SigLipLoss with chunk_size >= N: the B x N sigmoid logits (the plain form),
  siglip_chunked - SigLipLoss(chunk_size): chunk x chunk blocks, recomputed in backward.

Memory = peak bytes of live tensor storages created by the loss's forward+backward: every ATen
op's new outputs are tracked through a TorchDispatchMode and released when their storage dies
(saved activations, temporaries, feature gradients; views and in-place results add nothing).
Deterministic and device-independent; it misses only kernel-internal scratch. The CPU alternative,
peak RSS (VmHWM), was tried and rejected: glibc's heap reuse makes it swing by tens of MiB between
identical runs. On CUDA the allocator's own peak (max_memory_allocated) is printed as well.
Time is wall clock of the same run; it includes the tracking hook (~0.1 ms per ATen op).

Usage: python benchmarks/loss_memory.py [--sizes 1k,4k,16k,64k] [--world 8] [--dim 256]
       [--chunk-size 1024] [--mem-cap-gib 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lilt_ds.losses import ChunkedContrastiveLoss, ContrastiveLoss, GatheredBatch, SigLipLoss

GIB = 2**30
MODES = ("global", "local", "chunked", "siglip", "siglip_chunked")
BASELINE = {"global": "local", "local": "local", "chunked": "local", "siglip": "siglip", "siglip_chunked": "siglip"}
"""The mode each one's memory is a share of: the softmax losses of local, the sigmoid ones of plain SigLIP."""


# --------------------------------------------------------------------------------------------------
# Memory probes: start() before the run, stop() -> peak bytes above the start
# --------------------------------------------------------------------------------------------------


class LiveTensorPeak(TorchDispatchMode):
    """Peak total bytes of tensor storages created under this mode and still alive."""

    def start(self) -> None:
        self.live: set[int] = set()
        self.current = self.peak = 0
        self.__enter__()

    def stop(self) -> int:
        self.__exit__(None, None, None)
        return self.peak

    def _release(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:  # a view or an in-place result: no new memory
                continue
            self.live.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


class CudaPeakAllocated:
    """torch.cuda peak allocated bytes above what was allocated at start()."""

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.baseline


# --------------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------------


def estimate_peak_bytes(mode: str, n: int, b: int, dim: int, chunk: int, itemsize: int = 4) -> int:
    """Upper estimate used to skip configurations before allocating anything.

    Calibrated on measured peaks (fp32: global ~4 N^2 values, local ~3.8 B*N values, i.e. logits,
    log-softmax outputs and their gradients alive together) with some margin; chunked holds a few
    chunk-sized blocks and the per-block log-sum-exps. The feature gradients, 2 (B + N) D values,
    are added to all modes.
    """
    features = 2 * (b + n) * dim
    logits = {
        "global": 4.5 * n * n,
        "local": 4.5 * b * n,
        "chunked": 4 * min(chunk, b) * min(chunk, n) + 2 * b * (n // chunk + 1),
        "siglip": 4.5 * b * n,
        "siglip_chunked": 4 * min(chunk, b) * min(chunk, n),
    }[mode]
    return int((features + logits) * itemsize)


def make_loss(mode: str, chunk: int):
    if mode == "global":
        return ContrastiveLoss(local_loss=False)
    if mode == "local":
        return ContrastiveLoss(local_loss=True)
    if mode == "siglip":
        return SigLipLoss(chunk_size=2**62)
    if mode == "siglip_chunked":
        return SigLipLoss(chunk_size=chunk)
    return ChunkedContrastiveLoss(chunk_size=chunk, local_loss=True)


def forward_backward(mode: str, n: int, world: int, dim: int, chunk: int, device: str, probes=()) -> float:
    """Seconds for forward + backward of rank 0's loss share, run between the probes' start/stop.

    The local rows and the gathered rows are separate leaves, as the gather output is in training.
    """
    b = n // world

    def unit_rows(rows: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, dim, device=device), dim=1).requires_grad_()

    batch = GatheredBatch(
        local_img=unit_rows(b),
        local_txt=unit_rows(b),
        all_img=unit_rows(n),
        all_txt=unit_rows(n),
        offset=0,
        world_size=world,
    )
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True) if mode.startswith("siglip") else None
    loss_fn = make_loss(mode, chunk)
    for probe in probes:
        probe.start()
    started = time.perf_counter()
    loss = loss_fn.summed_loss(batch, scale, bias) * (world / n)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(mode: str, n: int, world: int, dim: int, chunk: int, device: str) -> tuple[int, int | None, float]:
    """(tensor peak bytes, CUDA allocator peak bytes or None, seconds) of one forward+backward.

    One run only, to keep the large configurations affordable: the time includes the tracking
    (a Python hook of ~0.1 ms per op: well under 1 s except for tiny-chunk, huge-N runs).
    """
    tensors = LiveTensorPeak()
    allocator = CudaPeakAllocated() if device == "cuda" else None
    seconds = forward_backward(mode, n, world, dim, chunk, device, probes=[p for p in (allocator, tensors) if p])
    tensor_peak = tensors.stop()
    return tensor_peak, allocator.stop() if allocator else None, seconds


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def format_bytes(num: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num) >= scale:
            return f"{num / scale:.1f} {unit}"
    return f"{num:.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1k,4k,16k,64k", help="global batch sizes N, comma-separated (k = 1024)")
    parser.add_argument("--world", type=int, default=8, help="simulated world size W (local rows B = N / W)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--mem-cap-gib", type=float, default=8.0, help="skip configurations estimated above this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    torch.manual_seed(0)
    for mode in MODES:  # one-time initialisation (thread pools, kernels) stays out of the numbers
        measure(mode, 256, 2, args.dim, args.chunk_size, args.device)

    print(
        f"# Contrastive loss, forward+backward of ONE rank, fp32, d={args.dim}, device={args.device}, "
        f"chunk_size={args.chunk_size}"
    )
    print(
        f"# W={args.world} ranks simulated in one process: B=N/W local rows against N gathered rows; "
        "no communication, all-gather buffers not counted"
    )
    print(
        "# peak memory = peak bytes of live tensors created by the loss (TorchDispatchMode tracking of every "
        "op's new outputs: saved activations, temporaries, feature gradients; kernel-internal scratch not "
        "seen); % = of local mode's"
    )
    print(
        f"# time = wall clock of the same forward+backward (includes the ~0.1 ms/op tracking hook), "
        f"{torch.get_num_threads()} threads; skipped = estimated above --mem-cap-gib {args.mem_cap_gib:g}"
    )
    print()
    allocator_column = " CUDA allocator peak |" if args.device == "cuda" else ""
    print(f"| N | mode | B (local rows) | peak memory | % of local (sigmoid: of siglip) |{allocator_column} time (s) |")
    print("|---|---|---|---|---|" + ("---|" if allocator_column else "") + "---|")
    cap = args.mem_cap_gib * GIB
    for n in (parse_size(s) for s in args.sizes.split(",")):
        b = n // args.world
        peaks = {}
        for mode in MODES:
            estimate = estimate_peak_bytes(mode, n, b, args.dim, args.chunk_size)
            if estimate > cap:
                blanks = " |" * (3 if allocator_column else 2)
                print(f"| {n} | {mode} | {b} | skipped (est. {estimate / GIB:.1f} GiB) |{blanks}", flush=True)
                continue
            tensor_peak, allocator_peak, seconds = measure(mode, n, args.world, args.dim, args.chunk_size, args.device)
            peaks[mode] = tensor_peak
            base = peaks.get(BASELINE[mode])
            share = f"{100 * tensor_peak / base:.1f}%" if base else ""
            allocator = f" {format_bytes(allocator_peak)} |" if allocator_column else ""
            print(
                f"| {n} | {mode} | {b} | {format_bytes(tensor_peak)} | {share} |{allocator} {seconds:.2f} |", flush=True
            )


if __name__ == "__main__":
    main()
