"""Parameter counts per tower: what a mode trains, counted without loading any weights."""

from __future__ import annotations

from torch import nn

from ..ds_compat import full_numel

GROUPS = ("vision", "text", "heads")  # heads: projections, temperature (and SigLIP bias)


def parameter_numel(p: nn.Parameter) -> int:
    """A parameter's size, also under ZeRO-3 (whose partitions leave ``numel()`` at 0)."""
    return full_numel(p)


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{group: {"total": n, "trainable": n}}`` for vision, text, heads and ``total``."""
    counts = {g: {"total": 0, "trainable": 0} for g in GROUPS + ("total",)}
    for name, p in model.named_parameters():
        group = name.split(".", 1)[0]
        group = group if group in ("vision", "text") else "heads"
        for key in (group, "total"):
            counts[key]["total"] += parameter_numel(p)
            counts[key]["trainable"] += parameter_numel(p) if p.requires_grad else 0
    return counts


def format_summary(counts: dict[str, dict[str, int]]) -> str:
    lines = [f"{'group':<8}{'parameters':>15}{'trainable':>15}{'trainable %':>13}"]
    for group, c in counts.items():
        pct = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        lines.append(f"{group:<8}{c['total']:>15,}{c['trainable']:>15,}{pct:>12.2f}%")
    return "\n".join(lines)
