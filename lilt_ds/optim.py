"""What the optimizer sees: the trainable parameters in groups, and the learning-rate schedules.

Groups carry their own learning rate where it differs from the ds_config's: a factor per tower
(``train.lr_scale``: EVA-CLIP's ``--visual-lr``/``--text-lr``) times layer-wise decay
(``model.<tower>.layer_decay``: BEiT/EVA-CLIP's ``ld ** (depth + 1 - layer)``, embeddings layer 0,
block i layer i + 1, what follows the blocks layer depth + 1). DeepSpeed's schedules scale each
group's own rate (WarmupCosineLR keeps the ratio), so the factors hold through the schedule.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

from torch import nn

from .errors import ConfigError
from .models.efficient import transformer_blocks

TOWERS = ("vision", "text")


def group_options(cfg) -> dict:
    """The keyword arguments of ``param_groups`` that the experiment config sets."""
    return {
        "weight_decay": cfg.train.weight_decay,
        "lr_scale": dataclasses.asdict(cfg.train.lr_scale),
        "layer_decay": {tower: getattr(cfg.model, tower).layer_decay for tower in TOWERS},
        "no_weight_decay": list(cfg.train.no_weight_decay),
    }


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    lr_scale: Mapping[str, float] | None = None,
    layer_decay: Mapping[str, float | None] | None = None,
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """Trainable parameters only, grouped by learning-rate factor, each factor in two groups: decayed
    matrices, and undecayed biases, norms, scalars and the names matching a ``no_weight_decay`` regex.

    A group whose factor is not 1 holds ``"lr"`` = ``lr`` x factor (``lr`` is required then). No
    group is ever empty (DeepSpeed ZeRO-1/2 index into each group's first parameter); with every
    factor 1 the groups are [decayed, undecayed], in the model's parameter order.
    """
    patterns = [re.compile(p) for p in no_weight_decay]
    factors = parameter_lr_factors(model, lr_scale or {}, layer_decay or {})
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or any(pt.search(name) for pt in patterns))
        groups.setdefault((factors[name], decays), []).append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameter: check mode, model.*.unlock and freeze_* settings")
    order = list(dict.fromkeys(factor for factor, _ in groups))
    out = []
    for factor in order:
        for decays in (True, False):
            params = groups.get((factor, decays))
            if not params:
                continue
            group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
            if factor != 1.0:
                if lr is None:
                    raise ValueError("param_groups: a learning-rate factor other than 1 needs the base lr")
                group["lr"] = lr * factor
            out.append(group)
    return out


def parameter_lr_factors(
    model: nn.Module, lr_scale: Mapping[str, float], layer_decay: Mapping[str, float | None]
) -> dict[str, float]:
    """Every parameter's learning-rate factor: its tower's scale (heads: the projections and the logit
    scale and bias) times its layer's decay."""
    factors = {}
    towers = {tower: getattr(model, tower, None) for tower in TOWERS}
    for tower, module in towers.items():
        decay = layer_decay.get(tower)
        layers = tower_layer_ids(module, tower, decay) if module is not None and decay is not None else {}
        for name, p in module.named_parameters() if module is not None else ():
            factor = float(lr_scale.get(tower, 1.0))
            if decay is not None:
                depth = layers[None]
                factor *= decay ** (depth + 1 - layers[name])
            factors[f"{tower}.{name}"] = factor
    heads = float(lr_scale.get("heads", 1.0))
    for name, _ in model.named_parameters():
        factors.setdefault(name, heads)
    return factors


def tower_layer_ids(tower: nn.Module, kind: str, decay) -> dict:
    """Parameter name -> layer id (0 before the first block, i + 1 in block i, depth + 1 after the
    last); key None holds the depth. Refuses a tower without transformer blocks."""
    blocks = transformer_blocks(tower)
    if not blocks:
        raise ConfigError(
            f"model.{kind}.layer_decay = {decay!r}: the {kind} tower {tower.model_name!r} has no "
            f"transformer blocks to decay by; set model.{kind}.layer_decay=null"
        )
    prefixes = [(f"trunk.{name}.", index) for index, name in blocks]  # block names are the trunk's
    depth = max(index for index, _ in blocks) + 1
    ids, seen_block = {None: depth}, False
    for name, _ in tower.named_parameters():
        index = next((i for prefix, i in prefixes if name.startswith(prefix)), None)
        if index is not None:
            ids[name], seen_block = index + 1, True
        else:
            ids[name] = depth + 1 if seen_block else 0
    return ids


class WarmupConstantCooldownLR:
    """Linear warmup from ``min_ratio`` to 1, constant, then a linear cooldown to ``min_ratio`` over
    the last ``cooldown_num_steps`` (the schedule of Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"), each group at its own rate times the
    ratio: DeepSpeed's scheduler interface, so checkpoints save and restore it."""

    def __init__(
        self,
        optimizer,
        total_num_steps: int,
        warmup_num_steps: int,
        cooldown_num_steps: int,
        min_ratio: float = 0.0,
        last_batch_iteration: int = -1,
    ):
        self.optimizer = optimizer
        self.total_num_steps = total_num_steps
        self.warmup_num_steps = max(1, warmup_num_steps)
        self.cooldown_num_steps = max(1, min(cooldown_num_steps, total_num_steps))
        self.min_ratio = min_ratio
        self.org_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = None

    def get_lr_ratio(self) -> float:
        step = max(0, self.last_batch_iteration)
        if step < self.warmup_num_steps:
            return self.min_ratio + (1.0 - self.min_ratio) * step / self.warmup_num_steps
        if step < self.total_num_steps - self.cooldown_num_steps:
            return 1.0
        left = max(0.0, (self.total_num_steps - 1 - step) / self.cooldown_num_steps)  # min_ratio at the last step
        return self.min_ratio + (1.0 - self.min_ratio) * left

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.last_batch_iteration = state["last_batch_iteration"]


def build_scheduler(optimizer, cfg, total_steps: int) -> WarmupConstantCooldownLR:
    """``train.schedule=constant_cooldown``'s scheduler for ``optimizer`` (DeepSpeed has none like it)."""
    train = cfg.train
    return WarmupConstantCooldownLR(
        optimizer,
        total_steps,
        warmup_num_steps=min(train.warmup_steps, total_steps),
        cooldown_num_steps=max(1, math.ceil(total_steps * train.cooldown_fraction)),
        min_ratio=train.min_lr / train.lr,
    )
