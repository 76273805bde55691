"""Parameter-efficient unlock sets for a locked tower: what trains, and the modules some items add.

An unlock set is a list such as ``[ln, adapters]`` or ``[bitfit, top_k:2]``. Each item is one
entry of ``UNLOCKS``: it may add modules to the tower (adapters, LoRA) and names the parameters
that train. Items that need transformer blocks find them through the tower's ``TowerLayout``, a
few regular expressions over module names, so one implementation serves timm ViTs and BERTs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower's transformer parts live: regexes that a module name must end with (at a dot)."""

    block: str  # one transformer block; group 1 is its index
    attn_linears: str  # every linear of the attention
    attn_out: str  # the attention output projection (an adapter follows it)
    mlp_linears: str  # every linear of the MLP
    mlp_out: str  # the MLP output linear (an adapter follows it)
    packed_attn: str | None = None  # nn.MultiheadAttention modules (LoRA by parametrization of their weights)
    branch_norms: str | None = None  # pre-norm blocks: the norms at the input of the attention and MLP branches


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", nn.LayerNorm))


class Adapter(nn.Module):
    """Houlsby bottleneck: x + up(GELU(down(x))). ``up`` starts at zero, so a new adapter is the identity."""

    def __init__(self, width: int, reduction: int = 4):
        super().__init__()
        if reduction < 1 or width // reduction < 1:
            raise ConfigError(f"adapter_reduction {reduction} is invalid for width {width}: use 1..{width}")
        self.down = nn.Linear(width, width // reduction)
        self.act = nn.GELU()
        self.up = nn.Linear(width // reduction, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _apply_adapter_hook(module: nn.Module, inputs, output):
    if isinstance(output, tuple):  # nn.MultiheadAttention: (attention output, weights)
        return (module.adapter(output[0]),) + output[1:]
    return module.adapter(output)


def _adapt_input_hook(module: nn.Module, args):
    return (module.adapter(args[0]),) + args[1:]


def _output_width(module: nn.Module) -> int:
    if isinstance(module, NORM_TYPES) and hasattr(module, "normalized_shape"):
        return module.normalized_shape[-1]
    return module.out_features if hasattr(module, "out_features") else module.embed_dim


def _suffix_regex(pattern: str) -> re.Pattern:
    return re.compile(r"(?:^|\.)(?:" + pattern + r")$")


def modules_matching(tower: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    regex = _suffix_regex(pattern)
    return [(name, m) for name, m in tower.trunk.named_modules() if name and regex.search(name)]


def transformer_blocks(tower: nn.Module) -> list[tuple[int, str]]:
    """(index, module name) of every block that holds attention; empty for convolutional towers."""
    regex = _suffix_regex(tower.layout.block) if tower.layout else None
    attn = {name for name, _ in modules_matching(tower, tower.layout.attn_out)} if tower.layout else set()
    blocks = []
    for name, _ in tower.trunk.named_modules():
        match = regex.search(name) if regex else None
        if match and any(a.startswith(name + ".") for a in attn):
            blocks.append((int(match.group(1)), name))
    return blocks


def _require_blocks(tower: nn.Module, item: str) -> list[tuple[int, str]]:
    blocks = transformer_blocks(tower)
    if not blocks:
        raise ConfigError(
            f"unlock item {item!r} needs transformer blocks, but the {tower.kind} tower {tower.model_name!r} has "
            "none (a convolutional network?). Use ln or bitfit for it, or a transformer model."
        )
    return blocks


def _param_names_under(tower: nn.Module, module_names) -> set[str]:
    prefixes = tuple(n + "." for n in module_names)
    return {n for n, _ in tower.trunk.named_parameters() if n.startswith(prefixes)}


def _ln(tower, arg, tower_cfg) -> set[str]:
    names = [n for n, m in tower.trunk.named_modules() if isinstance(m, NORM_TYPES)]
    return {f"{n}.{p}" for n in names for p, _ in tower.trunk.get_submodule(n).named_parameters(recurse=False)}


def _bitfit(tower, arg, tower_cfg) -> set[str]:
    return {n for n, _ in tower.trunk.named_parameters() if n.endswith("bias")}


def _attn(tower, arg, tower_cfg) -> set[str]:
    _require_blocks(tower, "attn")
    return _param_names_under(tower, [n for n, _ in modules_matching(tower, tower.layout.attn_linears)])


def _mlp(tower, arg, tower_cfg) -> set[str]:
    _require_blocks(tower, "mlp")
    return _param_names_under(tower, [n for n, _ in modules_matching(tower, tower.layout.mlp_linears)])


def _top_k(tower, k, tower_cfg) -> set[str]:
    blocks = _require_blocks(tower, "top_k")
    if not 1 <= k <= len(blocks):
        raise ConfigError(f"top_k:{k} is out of range: the {tower.kind} tower has {len(blocks)} blocks")
    last = sorted(blocks)[-k:]
    return _param_names_under(tower, [name for _, name in last])


def check_adapter_position(tower, tower_cfg) -> str:
    """The tower's ``adapter_position`` (its values are checked with the config), if the tower has that place."""
    position = tower_cfg.adapter_position
    if position == "branch_input" and (tower.layout is None or tower.layout.branch_norms is None):
        raise ConfigError(
            f"model.{tower.kind}.adapter_position=branch_input: the {tower.kind} tower "
            f"{tower.model_name!r} has no norm at the input of its attention and MLP branches "
            "(a post-norm block, as BERT's); use output"
        )
    return position


def _adapters(tower, arg, tower_cfg) -> set[str]:
    _require_blocks(tower, "adapters")
    reduction = tower_cfg.adapter_reduction
    if check_adapter_position(tower, tower_cfg) == "branch_input":
        for _, norm in modules_matching(tower, tower.layout.branch_norms):
            norm.adapter = Adapter(_output_width(norm), reduction)
            norm.register_forward_pre_hook(_adapt_input_hook)
    else:
        targets = modules_matching(tower, tower.layout.attn_out) + modules_matching(tower, tower.layout.mlp_out)
        for _, linear in targets:
            linear.adapter = Adapter(_output_width(linear), reduction)
            linear.register_forward_hook(_apply_adapter_hook)
    return {n for n, _ in tower.trunk.named_parameters() if ".adapter." in n}


def default_lora_targets(tower) -> str:
    """A regex (peft full-matches it) over the attention and MLP linears of the blocks (the MLP's
    alone where attention is packed: :func:`_lora_packed_attention` reaches that)."""
    if tower.layout.packed_attn:
        return f"(?:.*\\.)?(?:{tower.layout.mlp_linears})"
    return f"(?:.*\\.)?(?:{tower.layout.attn_linears}|{tower.layout.mlp_linears})"


class LoraDelta(nn.Module):
    """A parametrization ``W -> W + (alpha / r) B A`` (B starts at zero): LoRA on a weight that its module
    reads directly instead of calling a Linear, as ``nn.MultiheadAttention`` does with its packed
    in-projection and its out-projection. ``torch.nn.utils.parametrize.remove_parametrizations``
    merges it."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # as peft and Microsoft's loralib initialise A
        self.scaling = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling


def _lora_packed_attention(tower, lora_cfg) -> None:
    from torch.nn.utils import parametrize

    if lora_cfg.dropout:
        raise ConfigError(
            f"model.{tower.kind}.lora.dropout={lora_cfg.dropout}: the {tower.kind} tower's attention "
            "is an nn.MultiheadAttention, whose LoRA is a weight parametrization (no dropout on its "
            "input is possible); set it to 0.0, or restrict target_modules to the MLP linears"
        )
    rank, alpha = lora_cfg.rank, lora_cfg.alpha
    for _, attn in modules_matching(tower, tower.layout.packed_attn):
        for owner, name in ((attn, "in_proj_weight"), (attn.out_proj, "weight")):
            weight = getattr(owner, name)
            parametrize.register_parametrization(owner, name, LoraDelta(weight.shape[0], weight.shape[1], rank, alpha))


def _lora(tower, arg, tower_cfg) -> set[str]:
    from peft import LoraConfig, inject_adapter_in_model

    lora_cfg = tower_cfg.lora
    targets = lora_cfg.target_modules
    if targets is None:
        _require_blocks(tower, "lora")
        targets = default_lora_targets(tower)
        if tower.layout.packed_attn:
            _lora_packed_attention(tower, lora_cfg)
    elif tower.layout is not None and tower.layout.packed_attn:
        packed = [name for name, _ in modules_matching(tower, tower.layout.packed_attn)]
        hit = [n for n in packed if _matches_targets(n, targets) or _matches_targets(n + ".out_proj", targets)]
        if hit:
            raise ConfigError(
                f"model.{tower.kind}.lora.target_modules={targets!r} names {hit[0]} (and {len(hit) - 1} more) of the "
                f"{tower.kind} tower: an nn.MultiheadAttention, whose packed in-projection peft cannot wrap and whose "
                "out_proj never runs as a Linear. Leave target_modules=null (LoRA on the attention's packed weights "
                "and the MLP linears) or name MLP linears only"
            )
    config = LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
    )
    try:
        inject_adapter_in_model(config, tower.trunk)
    except ValueError as e:
        raise ConfigError(f"LoRA on the {tower.kind} tower: {e} (model.{tower.kind}.lora.target_modules)") from None
    return {n for n, _ in tower.trunk.named_parameters() if "lora_" in n}


def _matches_targets(name: str, targets) -> bool:
    """peft's rule: a string is a full-match regex, a list matches by name or dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# name -> function(tower, argument, tower config) -> trunk parameter names that train.
# Items that add modules (lora before adapters, so an adapter follows a LoRA-wrapped linear) run first.
UNLOCKS: dict[str, Callable] = {
    "lora": _lora,
    "adapters": _adapters,
    "ln": _ln,
    "bitfit": _bitfit,
    "attn": _attn,
    "mlp": _mlp,
    "top_k": _top_k,
}


def parse_unlock(items, where: str) -> list[tuple[str, int | None]]:
    """``[ln, top_k:2]`` -> ``[("ln", None), ("top_k", 2)]`` in the order the items are applied."""
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where} must be a list such as [ln, adapters], got {items!r}")
    parsed = []
    for item in items:
        name, _, arg = str(item).partition(":")
        if name not in UNLOCKS:
            raise ConfigError(
                f"unknown unlock item {item!r} in {where}: choose from {', '.join(UNLOCKS)} (top_k as top_k:K)"
            )
        count = None
        if name == "top_k":
            try:
                count = int(arg)
            except ValueError:
                raise ConfigError(
                    f"unlock item top_k needs a block count, as in top_k:2 (got top_k:{arg or None}) in {where}"
                ) from None
            if count < 1:
                raise ConfigError(f"top_k:{count} in {where} unlocks no block: use top_k:1 or more")
        parsed.append((name, count))
    order = list(UNLOCKS)
    return sorted(parsed, key=lambda p: order.index(p[0]))


def apply_unlocks(tower: nn.Module, items, tower_cfg, where: str) -> set[str]:
    """Add the modules the items ask for and return the trunk parameter names that train."""
    names: set[str] = set()
    for name, arg in parse_unlock(items, where):
        names |= UNLOCKS[name](tower, arg, tower_cfg)
    return names
