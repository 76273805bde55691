"""Parameter counts per tower: what a mode trains, counted without loading any weights."""

from __future__ import annotations

import argparse

from torch import nn

GROUPS = ("vision", "text", "heads")  # heads: projections, temperature (and SigLIP bias)


def _numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions leave numel() == 0


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{group: {"total": n, "trainable": n}}`` for vision, text, heads and ``total``."""
    counts = {g: {"total": 0, "trainable": 0} for g in GROUPS + ("total",)}
    for name, p in model.named_parameters():
        group = name.split(".", 1)[0]
        group = group if group in ("vision", "text") else "heads"
        for key in (group, "total"):
            counts[key]["total"] += _numel(p)
            counts[key]["trainable"] += _numel(p) if p.requires_grad else 0
    return counts


def format_summary(counts: dict[str, dict[str, int]]) -> str:
    lines = [f"{'group':<8}{'parameters':>15}{'trainable':>15}{'trainable %':>13}"]
    for group, c in counts.items():
        pct = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        lines.append(f"{group:<8}{c['total']:>15,}{c['trainable']:>15,}{pct:>12.2f}%")
    return "\n".join(lines)


def main(argv=None) -> None:
    from ..config import load_config
    from .dual_encoder import build_model

    parser = argparse.ArgumentParser(
        prog="python -m lilt_ds.models",
        description="Count parameters and trainable parameters of a config's model (no weights are loaded).",
    )
    parser.add_argument("--config", default="demo", help="preset name or YAML path")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value or +key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg, load_weights=False, device="meta")
    print(f"config {args.config}: mode={cfg.mode} vision={cfg.model.vision.name} text={cfg.model.text.name} "
          f"image_size={cfg.model.image_size}")
    print(format_summary(trainable_summary(model)))
