"""Training throughput: our trainer against a plain PyTorch loop and OpenCLIP's step, same model and batch.

    python benchmarks/throughput.py [--sizes tiny small] [--modes clip lit lilt] [--image-size 224]
        [--batch 16] [--warmup 3] [--steps 8] [--impls zero0 zero2 zero3 plain openclip]
        [--loader-impls zero2] [--workers 2] [--attention sdpa|eager] [--channels-last]
        [--compile] [--checkpointing] [--profile] [--peak-tflops T] [--malloc retain|system]
        [--output FILE.md]

For each tower size (``size``/``size``: DeiT and BERT presets, random weights) and mode (clip, lit,
lilt = LayerNorms + adapters in both towers), one process times full optimizer steps of
(see benchmarks/step_runners.py for how each is built and where they differ):

- ``zero0`` / ``zero2`` / ``zero3``: our trainer, ``lilt_ds.train.Trainer`` with
  ``ds_configs/zeroN.json`` (bf16), stepped with ``Trainer.optimizer_step``: what a run does per step;
- ``plain``: the same DualEncoder under DistributedDataParallel, ``torch.autocast`` bf16, AdamW;
- ``openclip``: OpenCLIP's CustomTextCLIP (timm tower by the same name, Hugging Face tower from our
  text tower's config) with ``ClipLoss``, as ``open_clip_train`` steps with ``--precision amp_bf16``
  (needs ``open_clip_torch``, in the test extra).

All start from the same weights and see the same batch (the first-loss column shows it). Step time is
the median over ``--steps`` steps after ``--warmup`` steps, from asking for the batch to the end of the
optimizer step (device synchronised). "synthetic" feeds one fixed batch of random tensors (data
loading excluded); the implementations of a mode are built together and stepped in turn, one step
each round after round, so a shared machine that speeds up or slows down shifts them alike. "with
data loading" then times ``--loader-impls`` one after the other on the built-in demo images through
the training loader (decode, RandomResizedCrop, RandAugment, tokenisation, ``--workers`` DataLoader
workers); the loader's share is the part of those steps spent waiting for the batch (the workers
also take CPU from the step itself on a small machine: compare the samples/s). Ratios: "x our clip" divides by our
ZeRO-2 clip of the
same size (for lit and lilt, one more runner of it steps in the same rounds), "x plain" and
"x OpenCLIP" by that implementation in the same mode. Model FLOPs of a step
are counted with ``torch.utils.flop_counter.FlopCounterMode``; on a GPU of known peak (or with
``--peak-tflops``) the model FLOPs utilisation is printed as MFU. On the CPU every implementation runs
with the host allocator setting our trainer makes there (``lilt_ds.allocator``: glibc keeps freed
memory instead of page-faulting DeepSpeed's per-step temporaries in again); ``--malloc system``
measures all with the C library's defaults instead.

Options apply to all implementations alike: ``--attention eager`` turns off
``F.scaled_dot_product_attention``, which timm's ViT and transformers' BERT already use by default
(``sdpa``); ``--channels-last`` (images and image tower); ``--compile`` (``torch.compile`` of both
trunks, in place); ``--checkpointing`` (activation checkpointing of the towers that train: our
``model.<tower>.grad_checkpointing``, OpenCLIP's ``set_grad_checkpointing``). ``--profile`` prints
torch.profiler's top operators of three steps of every implementation run.

Prints Markdown and writes it to ``--output`` (default outputs/benchmarks/throughput/throughput.md).
"""

import argparse
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from local configs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import step_runners as tp  # noqa: E402 (a sibling: the script's folder is first on sys.path)
import torch  # noqa: E402

from lilt_ds.allocator import ENV as ALLOCATOR_ENV  # noqa: E402
from lilt_ds.allocator import retain_freed_memory
from lilt_ds.runtime import init_distributed, present_device, process_group_scope  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("zero0", "zero1", "zero2", "zero3")
CLIP_REFERENCE = "our clip beside"  # our ZeRO-2 clip, stepped with the lit and lilt runners
LABELS = {
    "zero0": "ours ZeRO-0",
    "zero1": "ours ZeRO-1",
    "zero2": "ours ZeRO-2",
    "zero3": "ours ZeRO-3",
    "plain": "plain PyTorch (DDP, autocast)",
    "openclip": "OpenCLIP",
}


def ds_config_with_precision(impl: str, bf16: bool, folder: str) -> str:
    """``ds_configs/<impl>.json`` with bf16 on or off explicitly (the shipped files say "auto"), so
    that our trainer runs the precision the peers' autocast runs."""
    with open(os.path.join(ROOT, "ds_configs", f"{impl}.json")) as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": bf16}
    path = os.path.join(folder, f"{impl}-{'bf16' if bf16 else 'fp32'}.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    return path


def make_runner(impl: str, cfg, options: tp.StepOptions, bf16: bool, folder: str):
    prepare = tp.zero_text_projection_bias  # OpenCLIP's text projection has no bias: same function everywhere
    autocast = torch.bfloat16 if bf16 else None
    if impl in OURS:
        return tp.OursStep(cfg, ds_config_with_precision(impl, bf16, folder), options, prepare_model=prepare)
    if impl == "plain":
        return tp.PlainStep(cfg, options, prepare_model=prepare, autocast_dtype=autocast)
    if impl == "openclip":
        return tp.OpenClipStep(cfg, options, prepare_model=prepare, autocast_dtype=autocast)
    raise ValueError(f"unknown implementation {impl!r}")


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def measure_mode(cfg, options, args, synthetic, clip_cfg=None):
    """Every implementation on one (size, mode): built together, timed step by step in turn on the
    synthetic batch, then (``--loader-impls``) one after the other with the data loader.

    With ``clip_cfg`` (the lit and lilt modes) our ZeRO-2 clip steps in the same rounds, so that the
    ratio to our clip compares steps timed side by side. Returns (rows, that clip's StepTimes)."""
    rows, runners = {impl: {"impl": impl} for impl in args.impls}, {}
    builds = [(impl, impl, cfg) for impl in args.impls]
    if clip_cfg is not None and "zero2" in args.impls:
        builds.append((CLIP_REFERENCE, "zero2", clip_cfg))
        rows[CLIP_REFERENCE] = {"impl": "zero2"}
    try:
        for key, impl, build_cfg in builds:
            try:
                start = time.perf_counter()
                runners[key] = make_runner(impl, build_cfg, options, args.bf16, args.scratch)
                rows[key]["setup_s"] = time.perf_counter() - start
                rows[key]["params"], rows[key]["trainable"] = runners[key].counts()
            except Exception as e:  # noqa: BLE001 - one failing combination is a row, not the end
                rows[key]["error"] = error_text(e)
        batch = tp.host_batch(synthetic, options)
        times, errors = tp.time_interleaved(runners, batch, args.warmup, args.steps, seed=cfg.seed)
        for impl, t in times.items():
            rows[impl]["synthetic"] = t
        for impl, error in errors.items():
            rows[impl]["error"] = error
        for impl in args.loader_impls or ():
            if impl not in times:
                continue
            runner = runners[impl]
            loader = runner.loader()
            batches = tp.loader_batches(loader)
            try:
                rows[impl]["loaded"] = tp.time_steps(
                    runner, batches, args.warmup, args.steps, prepare=lambda b: tp.host_batch(b, options)
                )
            except Exception as e:  # noqa: BLE001
                rows[impl]["loader_error"] = error_text(e)
            finally:
                batches.close()
                tp.shutdown_loader(loader)
        if args.profile:
            for impl in times:
                if impl != CLIP_REFERENCE:
                    rows[impl]["profile"] = tp.profile_steps(runners[impl], batch, args.profile_steps)
    finally:
        for runner in runners.values():
            runner.close()
        runners.clear()
        gc.collect()
    reference = rows.pop(CLIP_REFERENCE, None) if clip_cfg is not None else rows.get("zero2")
    return list(rows.values()), (reference or {}).get("synthetic")


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b and a == a and b == b else ""


def fmt(x, spec=".1f") -> str:
    return format(x, spec) if x is not None and x == x else ""


def size_section(size, rows_by_mode, clip_refs, flops, args, world, peak) -> list[str]:
    out = [f"### {size}/{size} towers, {args.image_size} px, batch {args.batch} per device", ""]
    out += ["| mode | implementation | parameters | trainable | first loss |", "|---|---|---:|---:|---:|"]
    for mode, rows in rows_by_mode.items():
        for r in rows:
            if "error" in r:
                continue
            out.append(
                f"| {tp.MODE_LABELS[mode]} | {LABELS[r['impl']]} | {r['params']:,} | {r['trainable']:,} | "
                f"{r['synthetic'].first_loss:.4f} |"
            )
    out.append("")
    header = [
        "mode",
        "implementation",
        "step s",
        "samples/s",
        "per device",
        "x our clip",
        "x plain",
        "x OpenCLIP",
        "model TFLOP/s",
    ] + (["MFU"] if peak else [])
    out += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for mode, rows in rows_by_mode.items():
        by_impl = {r["impl"]: r for r in rows if "synthetic" in r}
        ref_clip_rate = clip_refs[mode].samples_per_s(args.batch) if clip_refs.get(mode) else None
        rate = {k: r["synthetic"].samples_per_s(args.batch) for k, r in by_impl.items()}
        for r in rows:
            if "error" in r:
                out.append(
                    f"| {tp.MODE_LABELS[mode]} | {LABELS[r['impl']]} | failed: {r['error']} |"
                    + " |" * (len(header) - 3)
                )
                continue
            t = r["synthetic"]
            sps = t.samples_per_s(args.batch)
            achieved = flops[mode] / t.median if flops.get(mode) else None
            cells = [
                tp.MODE_LABELS[mode],
                LABELS[r["impl"]],
                f"{t.median:.3f}",
                f"{sps:.1f}",
                f"{sps / world:.1f}",
                ratio(sps, ref_clip_rate),
                ratio(sps, rate.get("plain")),
                ratio(sps, rate.get("openclip")),
                fmt(achieved / 1e12 if achieved else None, ".3f"),
            ]
            if peak:
                cells.append(f"{achieved / peak:.1%}" if achieved else "")
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    loader_rows = [
        (mode, r) for mode, rows in rows_by_mode.items() for r in rows if "loaded" in r or "loader_error" in r
    ]
    if loader_rows:
        out += [
            f"Fed by the training loader ({args.workers} DataLoader workers on the demo images), each "
            "implementation alone after the rounds above:",
            "",
            "| mode | implementation | samples/s with data loading | synthetic (above) | step waiting for its batch |",
            "|---|---|---:|---:|---:|",
        ]
        for mode, r in loader_rows:
            if "loader_error" in r:
                out.append(f"| {tp.MODE_LABELS[mode]} | {LABELS[r['impl']]} | failed: {r['loader_error']} | | |")
                continue
            loaded = r["loaded"]
            out.append(
                f"| {tp.MODE_LABELS[mode]} | {LABELS[r['impl']]} | {loaded.samples_per_s(args.batch):.1f} | "
                f"{r['synthetic'].samples_per_s(args.batch):.1f} | {loaded.wait_share:.0%} |"
            )
        out.append("")
    return out


def targets_section(size, rows_by_mode, clip_refs, args) -> list[str]:
    def rate(mode, impl):
        r = next((r for r in rows_by_mode.get(mode, []) if r["impl"] == impl and "synthetic" in r), None)
        return r["synthetic"].samples_per_s(args.batch) if r else None

    def clip_beside(mode):  # our ZeRO-2 clip, timed in the same rounds as the mode
        return clip_refs[mode].samples_per_s(args.batch) if clip_refs.get(mode) else None

    clip = rate("clip", "zero2")
    checks = [
        ("our clip (ZeRO-2) >= 0.95x plain PyTorch", clip, rate("clip", "plain"), 0.95),
        ("our clip (ZeRO-0) >= 0.95x plain PyTorch", rate("clip", "zero0"), rate("clip", "plain"), 0.95),
        ("our clip (ZeRO-2) >= 1.0x OpenCLIP", clip, rate("clip", "openclip"), 1.0),
        ("our clip (ZeRO-0) >= 1.0x OpenCLIP", rate("clip", "zero0"), rate("clip", "openclip"), 1.0),
        ("our lilt (ln+adapters) >= 1.3x our clip (ZeRO-2)", rate("lilt", "zero2"), clip_beside("lilt"), 1.3),
        ("our lit >= 2x our clip (ZeRO-2)", rate("lit", "zero2"), clip_beside("lit"), 2.0),
    ]
    out = [f"Targets, {size}/{size} (synthetic data):", "", "| target | measured | met |", "|---|---:|---|"]
    for name, a, b, need in checks:
        if a and b:
            out.append(f"| {name} | {a / b:.2f}x | {'yes' if a / b >= need else '**no**'} |")
        else:
            out.append(f"| {name} | not measured | |")
    return out + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], help="tower presets (vision and text)")
    parser.add_argument("--modes", nargs="+", default=["clip", "lit", "lilt"], choices=list(tp.MODES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="micro batch per device")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["zero0", "zero2", "zero3", "plain", "openclip"],
        choices=[*OURS, "plain", "openclip"],
    )
    parser.add_argument(
        "--loader-impls",
        nargs="*",
        default=["zero2"],
        help="implementations also timed with the data loader (default zero2; none: skip)",
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.num_workers)")
    parser.add_argument("--demo-size", type=int, default=256, help="side of the demo images on disk")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops per implementation")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: the GPUs whose exact name step_runners.py lists)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="for every implementation: bf16 (our ds_config, the peers' autocast) or fp32; auto: "
        "bf16 where the device runs it natively, as the shipped ds_configs decide",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--malloc",
        choices=["retain", "system"],
        default="retain",
        help="CPU: glibc keeps freed memory for every implementation, as our trainer sets "
        "(lilt_ds.allocator; default), or the C library's own settings for all",
    )
    parser.add_argument("--output", default=os.path.join("outputs", "benchmarks", "throughput", "throughput.md"))
    args = parser.parse_args(argv)
    try:
        import open_clip
    except ImportError:
        open_clip = None
        if "openclip" in args.impls:
            print("open_clip_torch is not installed (pip install -e .[test]): skipping OpenCLIP", file=sys.stderr)
            args.impls = [i for i in args.impls if i != "openclip"]
    if args.threads:
        torch.set_num_threads(args.threads)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    _, world, device = init_distributed()
    facts = present_device()
    args.bf16 = facts.native_bf16 if args.precision == "auto" else args.precision == "bf16"
    precision = ("bf16" if args.bf16 else "fp32") + (f" (auto: {facts.reason})" if args.precision == "auto" else "")
    scratch = tempfile.TemporaryDirectory(prefix="lilt_ds-throughput-configs-")
    args.scratch = scratch.name
    malloc = "CUDA caching allocator"
    if device.type == "cpu":  # process-wide: the same allocator settings for every implementation
        if args.malloc == "system":
            os.environ[ALLOCATOR_ENV] = "system"  # our Trainer would set it otherwise
        malloc = (
            "glibc malloc keeping freed memory (lilt_ds.allocator)"
            if retain_freed_memory()
            else "the C library's default malloc"
        )
    peak = args.peak_tflops * 1e12 if args.peak_tflops else tp.peak_flops(device)
    mfu_note = (
        ""
        if peak or device.type == "cpu"
        else f" MFU: unknown (no peak listed for the exact name {torch.cuda.get_device_name(device)!r}; "
        "pass --peak-tflops)."
    )
    options = tp.StepOptions(
        channels_last=args.channels_last,
        attention=args.attention,
        compile=args.compile,
        checkpointing=args.checkpointing,
    )
    demo = {
        "n": max(1000, (args.warmup + args.steps + 2) * args.batch),
        "eval_n": 50,
        "seed": 0,
        "size": args.demo_size,
    }
    start = time.perf_counter()
    load = os.getloadavg()[0]
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} intra-op threads"
    )
    import deepspeed
    import timm
    import transformers

    versions = (
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}"
    )
    if open_clip is not None:
        versions += f", open_clip {open_clip.__version__}"
    lines = [
        "## Throughput",
        "",
        "`python benchmarks/throughput.py" + "".join(f" {a}" for a in sys.argv[1:]) + "`",
        "",
        f"{device_name}; {versions}; world size {world}; load average {load:.1f} at start. "
        f"{precision}; attention {args.attention}{', channels_last' if args.channels_last else ''}"
        f"{', torch.compile' if args.compile else ''}{', activation checkpointing' if args.checkpointing else ''}; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps; data loading with {args.workers} "
        f"DataLoader workers on demo images of {args.demo_size} px; {malloc} for all.{mfu_note}",
        "",
    ]
    print("\n".join(lines), flush=True)
    profiles = []
    for size in args.sizes:
        rows_by_mode, clip_refs, flops = {}, {}, {}
        configs = {
            mode: tp.benchmark_config(
                size,
                mode,
                args.image_size,
                args.batch,
                checkpointing=args.checkpointing,
                workers=args.workers,
                demo=demo,
                total_steps=10 * (args.warmup + args.steps),
            )
            for mode in {*args.modes, "clip"}
        }
        for mode in args.modes:
            cfg = configs[mode]
            flops[mode] = tp.count_step_flops(cfg, args.batch, device)
            synthetic = tp.synthetic_batch(cfg, args.batch)
            rows, clip_refs[mode] = measure_mode(
                cfg, options, args, synthetic, clip_cfg=None if mode == "clip" else configs["clip"]
            )
            for row in rows:
                t = row.get("synthetic")
                print(
                    f"  {size} {mode} {row['impl']}: "
                    + (
                        row["error"]
                        if "error" in row
                        else f"{t.median:.3f} s/step, {t.samples_per_s(args.batch):.1f} samples/s"
                        + (f", with loader {row['loaded'].samples_per_s(args.batch):.1f}" if "loaded" in row else "")
                    ),
                    file=sys.stderr,
                    flush=True,
                )
                if "profile" in row:
                    profiles.append((f"{size}/{size} {tp.MODE_LABELS[mode]}, {LABELS[row['impl']]}", row["profile"]))
            rows_by_mode[mode] = rows
        section = size_section(size, rows_by_mode, clip_refs, flops, args, world, peak) + targets_section(
            size, rows_by_mode, clip_refs, args
        )
        print("\n".join(section), flush=True)
        lines += section
    elapsed = time.perf_counter() - start
    lines.append(f"Total time {elapsed / 60:.1f} min.")
    print(lines[-1])
    for title, table in profiles:
        print(f"\nProfile: {title} ({args.profile_steps} steps)\n{table}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
        for title, table in profiles:
            f.write(f"\nProfile: {title}\n\n```\n{table}\n```\n")


def _in_a_process_group(argv=None):
    with process_group_scope():
        main(argv)


if __name__ == "__main__":
    from lilt_ds.cli import run

    run(_in_a_process_group)
