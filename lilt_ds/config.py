"""Loading an experiment config: a preset plus overrides (:mod:`lilt_ds.presets`), then one validation
pass over everything a user can write, before any model or data is built.

Every key of ``configs/_base.yaml`` is checked here: its type and range, enumerations, and the paths
that must exist. Sections that a layer below owns are checked by that layer's own functions (the
model section by :func:`lilt_ds.models.check_model_config`, the loss by
:func:`lilt_ds.losses.loss_arguments`, the data by :func:`lilt_ds.data.resolve_data_config`), the same
ones that guard the build, so a message reads the same whenever it comes. Keys added with
``+key=value`` are the user's own and are not checked.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from .data import check_cache_config, check_zeroshot, resolve_data_config
from .errors import ConfigError
from .losses import loss_arguments
from .models import check_model_config
from .models.efficient import ADAPTER_POSITIONS
from .original_flags import apply_flags, split_flags
from .presets import (Config, apply_override, available_presets, base_defaults, parse_override, read_config,  # noqa: F401
                      save_config, to_config)


# ---------------------------------------------------------------------------------- value rules
class Rule:
    """What one key accepts: ``check`` returns the value (normalised) or raises ConfigError naming the key."""

    text = "a value"

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def check(self, key: str, value):
        if not self.accepts(value):
            raise ConfigError(f"{key} = {value!r}: expected {self.text}")
        return value


class Int(Rule):
    def __init__(self, minimum: int | None = None):
        self.minimum = minimum
        self.text = "an integer" + ("" if minimum is None else f" >= {minimum}")

    def accepts(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and (self.minimum is None or value >= self.minimum)


class Number(Rule):
    def __init__(self, minimum: float | None = None, positive: bool = False, below: float | None = None,
                 maximum: float | None = None):
        self.minimum, self.positive, self.below, self.maximum = minimum, positive, below, maximum
        bounds = ["> 0"] if positive else ([f">= {minimum:g}"] if minimum is not None else [])
        bounds += [f"< {below:g}"] if below is not None else []
        bounds += [f"<= {maximum:g}"] if maximum is not None else []
        self.text = "a number" + (" " + " and ".join(bounds) if bounds else "")

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return ((not self.positive or value > 0) and (self.minimum is None or value >= self.minimum)
                and (self.below is None or value < self.below) and (self.maximum is None or value <= self.maximum))

    def check(self, key: str, value):
        return float(super().check(key, value))


class OneOf(Rule):
    def __init__(self, *choices: str):
        self.choices, self.text = choices, "one of " + ", ".join(choices)

    def accepts(self, value) -> bool:
        return value in self.choices


class Pattern(Rule):
    text = "a regular expression (Python re)"

    def accepts(self, value) -> bool:
        try:
            re.compile(value)
        except (re.error, TypeError):
            return False
        return isinstance(value, str) and bool(value)


class Bool(Rule):
    text = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class Str(Rule):
    text = "a non-empty string"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and bool(value)


class Nullable(Rule):
    def __init__(self, rule: Rule):
        self.rule, self.text = rule, f"{rule.text}, or null"

    def accepts(self, value) -> bool:
        return value is None or self.rule.accepts(value)

    def check(self, key: str, value):
        return None if value is None else self.rule.check(key, super().check(key, value))


class Either(Rule):
    def __init__(self, *rules: Rule, text: str):
        self.rules, self.text = rules, text

    def accepts(self, value) -> bool:
        return any(rule.accepts(value) for rule in self.rules)


class ListOf(Rule):
    def __init__(self, rule: Rule):
        self.rule, self.text = rule, f"a list of {rule.text}s"

    def accepts(self, value) -> bool:
        return isinstance(value, list) and all(self.rule.accepts(v) for v in value)


LORA = {"rank": Int(1), "alpha": Number(positive=True), "dropout": Number(0.0, below=1.0),
        "target_modules": Nullable(Either(Str(), ListOf(Str()), text="a module name pattern or a list of them"))}
TOWER = {"name": Str(), "pretrained": Either(Bool(), Str(), text="true, false or a weights source"),
         "unlock": ListOf(Str()), "adapter_reduction": Int(1),
         "adapter_position": OneOf(*ADAPTER_POSITIONS), "grad_checkpointing": Bool(),
         "layer_decay": Nullable(Number(positive=True, maximum=1.0)),
         **{f"lora.{k}": rule for k, rule in LORA.items()}}
RULES: dict[str, Rule] = {
    "seed": Int(0), "output_dir": Nullable(Str()),
    "model.init_from": Nullable(Str()), "model.init_weights": Nullable(Str()),
    "model.embed_dim": Int(1), "model.image_size": Nullable(Int(8)), "model.freeze_projections": Bool(),
    "model.freeze_logit_scale": Bool(), "model.init_logit_scale": Nullable(Number()),
    "model.init_logit_bias": Nullable(Number()),
    **{f"model.vision.{k}": rule for k, rule in TOWER.items()},
    **{f"model.text.{k}": rule for k, rule in TOWER.items()},
    "model.text.tokenizer": Nullable(Str()), "model.text.pooling": Str(),
    "model.vision.patch_dropout": Number(0.0, maximum=0.9),
    "memory.frozen_recompute": Bool(),
    "loss.type": Str(), "loss.local_loss": Bool(), "loss.gather_with_grad": Bool(), "loss.chunk_size": Int(1),
    "loss.tile_rows": Nullable(Int(1)), "loss.tile_cols": Nullable(Int(1)),
    "train.epochs": Int(1), "train.max_steps": Nullable(Int(1)), "train.micro_batch_size": Int(1),
    "train.grad_accum_steps": Int(1), "train.exact_accumulation": Bool(), "train.lr": Number(positive=True),
    "train.min_lr": Number(0.0), "train.weight_decay": Number(0.0), "train.warmup_steps": Int(0),
    "train.grad_clip": Number(0.0), "train.log_every": Int(1), "train.max_nonfinite_steps": Int(1),
    "train.deterministic": Bool(),
    "train.compile": Either(Bool(), Str(), text="true, false or a torch.compile backend name"),
    **{f"train.lr_scale.{part}": Number(positive=True) for part in ("vision", "text", "heads")},
    "train.no_weight_decay": ListOf(Pattern()), "train.schedule": OneOf("cosine", "constant", "constant_cooldown"),
    "train.cooldown_fraction": Number(positive=True, maximum=1.0),
    "checkpoint.every_steps": Nullable(Int(1)), "checkpoint.save_last_only": Bool(),
    "eval.every_epochs": Int(0), "eval.batch_size": Int(1),
    "eval.classification.data": Nullable(Str()), "eval.classification.image_root": Nullable(Str()),
    "eval.classification.classnames": Nullable(Str()), "eval.classification.templates": Str(),
    "eval.classification.every_epochs": Int(0),
    "logging.disable_wandb": Bool(), "logging.wandb_project": Str(), "logging.wandb_run_name": Nullable(Str()),
}
"""Every key of ``configs/_base.yaml`` but ``mode`` (checked by the models) and ``data.*`` (by the data)."""


def check_compile(value) -> str | None:
    """``train.compile`` -> the torch.compile backend (None: eager)."""
    if value is False:
        return None
    backend = "inductor" if value is True else value
    import torch

    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"train.compile = {value!r}: not a torch.compile backend; use true (inductor), false "
                          f"or one of {', '.join(known)}")
    return backend


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


# ---------------------------------------------------------------------------------- the pass
def validate(cfg: Config) -> None:
    """Check everything a user can write in ``cfg`` (normalising in place: lists, numbers, data paths)."""
    for tower in ("vision", "text"):
        if cfg.model[tower].unlock is None:
            cfg.model[tower].unlock = []
    for key, rule in RULES.items():
        _set(cfg, key, rule.check(key, _get(cfg, key)))
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr = {cfg.train.min_lr!r} is above train.lr = {cfg.train.lr!r}: the cosine "
                          "schedule decays from lr to min_lr; lower train.min_lr")
    check_model_config(cfg)
    check_compile(cfg.train.compile)
    loss_arguments(cfg.loss)
    cfg.data = resolve_data_config(cfg.data, must_exist=True)
    check_cache_config(cfg)
    check_zeroshot(cfg.eval.classification)


def load_config(name: str = "demo", overrides: Iterable[str] = ()) -> Config:
    """Resolve a preset name or YAML path, then the overrides, into a Config checked in full."""
    ours, original = split_flags(overrides)
    cfg = read_config(name, ours)
    apply_flags(cfg, original, explicit=dict(parse_override(text)[:2] for text in ours))
    validate(cfg)
    return cfg
