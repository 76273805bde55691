"""Charts of runs from what they wrote (``steps.jsonl``, ``results.jsonl``): one figure of six panels,
several runs drawn on the same axes so that they compare at a glance."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from lilt_ds.errors import LiltError

from .charts import pyplot

# (key of steps.jsonl, panel title)
STEP_PANELS = [
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("logit_scale", "logit scale (1 / temperature)"),
    ("samples_per_s", "samples/s (all ranks)"),
    ("data_wait", "share of time waiting for data"),
]
RECALL = (("txt_r1", "i->t R@1", "-"), ("img_r1", "t->i R@1", "--"))


@dataclass
class RunRecords:
    name: str
    steps: list[dict]
    results: list[dict] = field(default_factory=list)  # evaluations only (an early-stop line is left out)


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run(folder: str) -> RunRecords:
    """A run's records; a folder without steps.jsonl is a mistake the message names."""
    steps_path = os.path.join(folder, "steps.jsonl")
    if not os.path.isfile(steps_path):
        raise LiltError(
            f"{folder} has no steps.jsonl: give a run's output_dir (it holds steps.jsonl, results.jsonl, train.log)"
        )
    results_path = os.path.join(folder, "results.jsonl")
    results = _jsonl(results_path) if os.path.isfile(results_path) else []
    name = os.path.basename(os.path.normpath(folder))
    return RunRecords(name, _jsonl(steps_path), [r for r in results if "txt_r1" in r or "zeroshot_top1" in r])


def plot_runs(runs: list[RunRecords], path: str):
    """The six panels of ``runs`` saved as a PNG at ``path``; returns the figure (closed) for its data."""
    plt = pyplot()
    if plt is None:
        raise LiltError('plotting needs matplotlib: pip install -e ".[plot]"')
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = list(axes.flat)
    for ax, (key, title) in zip(panels, STEP_PANELS):
        for run in runs:
            points = [(r["step"], r[key]) for r in run.steps if key in r]
            if points:
                ax.plot(*zip(*points), label=run.name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    recall = panels[-1]
    for index, run in enumerate(runs):
        color = f"C{index}"
        for key, label, style in RECALL:
            points = [(r["step"], r[key]) for r in run.results if key in r]
            if points:
                recall.plot(*zip(*points), style, marker="o", color=color, label=f"{run.name} {label}")
    recall.set_title("held-out recall (%)", fontsize=10)
    recall.set_xlabel("step")
    for ax in panels:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
