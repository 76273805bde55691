"""Memory reports: the estimate as Markdown, CSV and a PNG chart, the comparison with a measurement,
and the work of the profile_memory command (lilt_ds.cli.profile_memory: will a config fit my GPUs?)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import textwrap
from dataclasses import dataclass

from ..config import load_config
from ..engine import load_ds_config, resolve_device_choices
from ..errors import ConfigError
from ..memory import (
    CATEGORIES,
    GIB,
    LABELS,
    MIB,
    MODEL_STATES,
    Measurement,
    MemoryEstimate,
    MemoryModel,
    format_gib,
    measure_training_memory,
    parse_memory_size,
    usable_bytes,
)
from ..memory.estimate import check_headroom
from ..runtime import GPU_TARGET, init_distributed, present_device, process_group_scope
from .charts import pyplot


def estimate_rows(estimates: list[MemoryEstimate]) -> list[dict]:
    """One flat record per estimate (bytes), the CSV's rows."""
    rows = []
    for e in estimates:
        row = {
            "model": e.model,
            "zero": e.settings.describe(),
            "checkpointing": e.checkpointing,
            "world_size": e.settings.world_size,
            "micro_batch": e.micro_batch,
        }
        row.update({c: e.gpu[c] for c in CATEGORIES})
        row.update(
            gpu_total=e.gpu_total,
            offloaded=e.offloaded_total,
            budget=e.budget,
            fits=e.fits,
            largest_micro_batch=e.largest_micro_batch,
        )
        rows.append(row)
    return rows


def estimate_table(estimates: list[MemoryEstimate]) -> str:
    """Markdown: GiB per rank by category on the GPU, the total, what is offloaded, and the verdict."""
    budget = next((e.budget for e in estimates if e.budget is not None), None)
    head = ["model", "ZeRO", "ckpt", *(LABELS[c] for c in CATEGORIES), "GPU total", "offloaded"]
    if budget is not None:
        head += [f"fits {format_gib(budget)} GiB", "largest micro batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in estimates:
        cells = [
            e.model,
            e.settings.describe(),
            "yes" if e.checkpointing else "no",
            *(format_gib(e.gpu[c]) for c in CATEGORIES),
            f"**{format_gib(e.gpu_total)}**",
            format_gib(e.offloaded_total),
        ]
        if budget is not None:
            cells += ["yes" if e.fits else "**no**", str(e.largest_micro_batch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_rows(estimate: MemoryEstimate, measured: Measurement) -> list[dict]:
    """Estimate next to measurement, like with like: each category wherever it lives (GPU, CPU RAM),
    model states and all categories summed, error in percent. On a GPU also the allocator's peak,
    which holds what no category counts (what lives only inside backward and the optimizer step):
    shown with its excess over the measured categories, which the estimate's headroom must cover."""
    pairs = [(LABELS[c], estimate.total(c), measured.bytes[c]) for c in CATEGORIES]
    pairs.insert(
        len(MODEL_STATES),
        ("model states", sum(estimate.total(c) for c in MODEL_STATES), sum(measured.bytes[c] for c in MODEL_STATES)),
    )
    categories = sum(measured.bytes[c] for c in CATEGORIES)
    pairs.append(("all categories", sum(estimate.total(c) for c in CATEGORIES), categories))
    rows = [
        {
            "quantity": name,
            "estimate": est,
            "measured": got,
            "error_percent": None if not got else 100.0 * (est - got) / got,
        }
        for name, est, got in pairs
    ]
    rows.append(
        {
            "quantity": "other engine tensors (not estimated)",
            "estimate": None,
            "measured": measured.bytes.get("other", 0),
            "error_percent": None,
        }
    )
    if measured.peak_allocated is not None:
        rows += [
            {
                "quantity": "GPU peak allocated (max_memory_allocated): the categories plus activation gradients, "
                "loss temporaries, optimizer-step temporaries and cuBLAS workspace",
                "estimate": None,
                "measured": measured.peak_allocated,
                "error_percent": None,
            },
            {
                "quantity": "GPU peak allocated beyond the measured categories (for the headroom)",
                "estimate": None,
                "measured": measured.peak_allocated - categories,
                "error_percent": None,
            },
            {
                "quantity": "GPU peak reserved (max_memory_reserved): the peak plus the caching allocator's slack",
                "estimate": None,
                "measured": measured.peak_reserved,
                "error_percent": None,
            },
        ]
    return rows


def comparison_table(rows: list[dict]) -> str:
    lines = ["| quantity | estimate MiB | measured MiB | error |", "|---|---|---|---|"]
    for r in rows:
        error = "" if r["error_percent"] is None else f"{r['error_percent']:+.1f}%"
        estimate = "" if r["estimate"] is None else f"{r['estimate'] / MIB:.2f}"
        lines.append(f"| {r['quantity']} | {estimate} | {r['measured'] / MIB:.2f} | {error} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_estimates(estimates: list[MemoryEstimate], path: str, title: str) -> str | None:
    """Stacked bars of GPU GiB by category, one bar per estimate, the budget as a line; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(estimates) + 2), 5.5))
    x = range(len(estimates))
    bottom = [0.0] * len(estimates)
    for category in CATEGORIES:
        heights = [e.gpu[category] / GIB for e in estimates]
        ax.bar(x, heights, bottom=bottom, label=LABELS[category])
        bottom = [b + h for b, h in zip(bottom, heights)]
    budget = next((e.budget for e in estimates if e.budget is not None), None)
    if budget is not None:
        ax.axhline(budget / GIB, color="black", linestyle="--", linewidth=1, label=f"usable {budget / GIB:.1f} GiB")
    ax.set_xticks(
        list(x),
        [f"{e.model}\n{e.settings.describe()}" + ("\nckpt" if e.checkpointing else "") for e in estimates],
        rotation=90,
        fontsize=7,
    )
    ax.set_ylabel("GiB per GPU")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_micro_batch_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]], budget_gib: float | None, path: str, title: str
) -> str | None:
    """GiB per GPU against the micro batch, a panel per ds_config (``curves[ds_config][model]`` =
    [(micro batch, GiB)]), a line per model, the budget as a dashed line; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), sharey=True, squeeze=False)
    for ax, (ds_name, by_model) in zip(axes.flat, curves.items()):
        for model, points in by_model.items():
            ax.plot(*zip(*points), marker="o", markersize=3, label=model)
        if budget_gib is not None:
            ax.axhline(budget_gib, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(ds_name, fontsize=10)
        ax.set_xlabel("micro batch per GPU")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("GiB per GPU")
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(estimates: list[MemoryEstimate], output_dir: str, stem: str, title: str) -> list[str]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` in ``output_dir``; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    md = os.path.join(output_dir, f"{stem}.md")
    with open(md, "w") as f:
        f.write(f"{title}\n\n{estimate_table(estimates)}\n")
    written = [md, write_csv(estimate_rows(estimates), os.path.join(output_dir, f"{stem}.csv"))]
    png = plot_estimates(estimates, os.path.join(output_dir, f"{stem}.png"), title)
    return written + ([png] if png else [])


# --------------------------------------------------------------------------------------------------
# The command (lilt_ds.cli.profile_memory)
# --------------------------------------------------------------------------------------------------


@dataclass
class ProfileRequest:
    """Arguments of the profile_memory command; ``check()`` rejects bad ones before any slow work."""

    config: str = "lilt"
    overrides: list = dataclasses.field(default_factory=list)
    ds_config: str = "zero2"  # a packaged name or a path (lilt_ds.ds_configs.ds_config_path)
    world_size: int | None = None
    micro_batch: int | None = None
    gpu_memory: str | None = None
    headroom: float = 0.1
    measure: bool = False
    output_dir: str | None = None
    probe_batch: int = 2

    def check(self) -> None:
        if self.gpu_memory is not None:
            parse_memory_size(self.gpu_memory)
        check_headroom(self.headroom)
        for name in ("world_size", "micro_batch", "probe_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def run_profile(request: ProfileRequest) -> str:
    """Estimate (and with ``measure`` also measure) one config; writes the reports and returns the text to print."""
    request.check()
    ds_raw = load_ds_config(request.ds_config)
    cfg = load_config(request.config, request.overrides)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    world_size = request.world_size or launched
    if request.measure and world_size != launched:
        raise ConfigError(
            f"--measure runs on the {launched} process(es) launched here, not --world-size {world_size}: "
            f"start it with `deepspeed --num_gpus {world_size} --module lilt_ds.cli.profile_memory ...`"
        )
    explicit = ds_raw.get("train_micro_batch_size_per_gpu")
    micro_batch = request.micro_batch or (explicit if isinstance(explicit, int) else cfg.train.micro_batch_size)
    budget = usable_bytes(parse_memory_size(request.gpu_memory), request.headroom) if request.gpu_memory else None

    with process_group_scope() if request.measure else contextlib.nullcontext():
        if request.measure:  # binds this rank's device first: the estimate's activations are measured there
            init_distributed()
        device = present_device() if request.measure else GPU_TARGET  # whose "auto" ds_config choices
        memory = MemoryModel(cfg, ds_raw, world_size, probe_batch=request.probe_batch, device=device)
        rank = int(os.environ.get("RANK", "0")) if request.measure else None
        estimate = memory.estimate(micro_batch, budget, rank=rank)
        output_dir = request.output_dir or os.path.join("outputs", f"memory-{cfg.config_name}")
        name = os.path.splitext(os.path.basename(request.ds_config))[0]
        title = (
            f"{estimate.model}, {estimate.settings.describe()} ({name}), {world_size} GPU(s), micro batch "
            f"{micro_batch}, {cfg.model.vision.name}/{cfg.model.text.name} at {cfg.model.image_size} px: "
            f"GiB per GPU"
        )
        per_sample = memory.activations.bytes_per_sample(memory.settings.zero3_linear) / MIB
        text = [
            title,
            "",
            estimate_table([estimate]),
            "",
            f"{str(memory.settings.dtype).replace('torch.', '')} weights and activations; activations measured "
            f"at batch {memory.activations.probe_batch} on {memory.activations.device}: "
            f"{per_sample:.2f} MiB per sample",
        ]
        text += [f"ds_config choice: {note}" for note in resolve_device_choices(ds_raw, device, request.ds_config)[1]]
        if budget is not None:
            verdict = "fits" if estimate.fits else "does NOT fit"
            text.append(
                f"verdict: {verdict} in {request.gpu_memory} with {request.headroom:.0%} headroom "
                f"({format_gib(budget)} GiB usable); largest micro batch that fits: "
                f"{estimate.largest_micro_batch}"
            )
        measured_rows = None
        if request.measure:
            measured = measure_training_memory(cfg, ds_raw, micro_batch, request.ds_config)
            measured_rows = comparison_rows(estimate, measured)
            text += [
                "",
                f"measured on {measured.device} (rank {rank} of {measured.world_size}), two DeepSpeed steps:",
                "",
                comparison_table(measured_rows),
            ]
    if rank not in (None, 0):
        return ""
    written = write_report([estimate], output_dir, "estimate", title)
    if measured_rows:
        with open(os.path.join(output_dir, "measured.md"), "w") as f:
            f.write(comparison_table(measured_rows) + "\n")
        written += [
            os.path.join(output_dir, "measured.md"),
            write_csv(measured_rows, os.path.join(output_dir, "measured.csv")),
        ]
    if not any(p.endswith(".png") for p in written):
        text.append("no PNG chart: matplotlib is missing (pip install -e .[plot])")
    text += ["", "written: " + ", ".join(written)]
    return "\n".join(text)
