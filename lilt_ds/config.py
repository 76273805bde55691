"""Loading an experiment config: a preset plus overrides (:mod:`lilt_ds.presets`), parsed into the typed
schema (:mod:`lilt_ds.schema`: each key's type and range), then the checks that need more than one
value, before any model or data is built.

Each section's own checks that need its layer run through that layer's function, the same one that
guards the build, so a message reads the same whenever it comes: the model section's
(:func:`lilt_ds.models.check_model_config`: tower names, weight sources, unlock sets, a pretrained
pair), the loss's (:func:`lilt_ds.losses.loss_arguments`: the registry), the data's
(:func:`lilt_ds.data.resolve_data_config`: files, augmentation). The checks that span sections live
here. What a ds_config decides (ZeRO stage, precision) is checked against the experiment config when
the ds_config is resolved (:func:`lilt_ds.engine.resolve_ds_config`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterable

from .data import check_zeroshot, resolve_data_config
from .errors import ConfigError
from .losses import loss_arguments
from .models import check_model_config
from .models.modes import is_fully_locked
from .original_flags import apply_flags, split_flags
from .presets import parse_override, read_config
from .schema import ExperimentConfig, parse, replace_keys
from .tracking import check_watched_metrics

OPEN_CLIP_CONTEXT_LENGTH = 77  # an hf-hub: OpenCLIP pair's, unknown before its download (the tokenizer caps it)


def check_compile(value) -> str | None:
    """``train.compile`` -> the torch.compile backend (None: eager)."""
    if value is False:
        return None
    backend = "inductor" if value is True else value
    import torch

    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(
            f"train.compile = {value!r}: not a torch.compile backend; use true (inductor), false "
            f"or one of {', '.join(known)}"
        )
    return backend


# ---------------------------------------------------------------------------------- across sections
def check_schedule(cfg: ExperimentConfig) -> None:
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(
            f"train.min_lr = {cfg.train.min_lr!r} is above train.lr = {cfg.train.lr!r}: the cosine "
            "schedule decays from lr to min_lr; lower train.min_lr"
        )


def resolve_kept_checkpoints(cfg: ExperimentConfig) -> ExperimentConfig:
    """``checkpoint.save_last_only`` (the original's flag) is ``checkpoint.keep_last: 1``."""
    if not cfg.checkpoint.save_last_only:
        return cfg
    if cfg.checkpoint.keep_last not in (None, 1):
        raise ConfigError(
            "checkpoint.save_last_only=true keeps one checkpoint, but "
            f"checkpoint.keep_last={cfg.checkpoint.keep_last}: set one of them"
        )
    return replace_keys(cfg, {"checkpoint.keep_last": 1})


def check_pair(cfg: ExperimentConfig, facts) -> None:
    """A pretrained pair (``model.init_from``) against the loss and the memory settings."""
    if facts.kind != "pair":
        return
    where = f"model.init_from={cfg.model.init_from}"
    if cfg.memory.frozen_recompute:
        raise ConfigError(
            f"memory.frozen_recompute with {where}: frozen recomputation knows timm and BERT blocks "
            "only; turn it off (model.<tower>.grad_checkpointing works for pairs)"
        )
    if facts.sigmoid and cfg.loss.type != "siglip":
        raise ConfigError(
            f"{where} is a SigLIP (sigmoid) pair, but loss.type={cfg.loss.type}: set loss.type=siglip "
            "(its logit bias trains only with the sigmoid loss)"
        )


def resolve_text(data, facts):
    """A pretrained pair's captions: raw text at its context length (its tokenizer expects that), where
    the config leaves ``data.clean_captions``, ``data.max_length`` and ``data.eval_max_length`` null; other
    models keep the original's cleaning and lengths (resolve_data_config fills them in)."""
    if facts.kind != "pair":
        return data
    length = facts.context_length or OPEN_CLIP_CONTEXT_LENGTH
    chosen = {"clean_captions": False, "max_length": length, "eval_max_length": length}
    return dataclasses.replace(data, **{k: v for k, v in chosen.items() if getattr(data, k) is None})


def check_cache(cfg: ExperimentConfig) -> None:
    """The locked-tower feature cache is asked for where it can work (the image tower trains nothing,
    its output does not depend on the run's RNG, a caption file to key it by, a place to write it)."""
    data, vision = cfg.data, cfg.model.vision
    if not data.cache_locked_features:
        return
    if not is_fully_locked(cfg.mode, "vision", vision.unlock):
        raise ConfigError(
            f"data.cache_locked_features=true caches the image tower's output, but mode={cfg.mode} with "
            f"model.vision.unlock={list(vision.unlock)} trains it, so its output changes every step: "
            "use mode=lit, or mode=lilt with model.vision.unlock=[] (or turn the cache off)"
        )
    if vision.patch_dropout:
        raise ConfigError(
            f"data.cache_locked_features=true with model.vision.patch_dropout={vision.patch_dropout}: patch "
            "dropout draws new patches every step, so the tower's output is not a function of the image "
            "and cannot be cached. Set model.vision.patch_dropout=0.0 or turn the cache off (a cached tower "
            "costs nothing to run, so patch dropout would save nothing)"
        )
    if data.train_shards is not None:
        raise ConfigError(
            "data.cache_locked_features=true works with data.train_files (its entries are the cache's "
            "rows); data.train_shards streams samples without a fixed index. Train on caption JSON files "
            "or turn the cache off"
        )
    if data.index_cache is None:
        raise ConfigError(
            "data.cache_locked_features=true stores the features where data.index_cache puts the caption "
            "index, and data.index_cache is null (no file): set it to auto or a folder"
        )


def check_tensorboard(cfg: ExperimentConfig) -> None:
    """``logging.tensorboard`` needs the tensorboard package (torch's SummaryWriter imports it)."""
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logging.tensorboard = true, but the tensorboard package is not installed: "
            'pip install -e ".[tensorboard]" (or pip install tensorboard), or set logging.tensorboard=false'
        )


# ---------------------------------------------------------------------------------- the pass
def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` checked in full, with what loading resolves (the image size, the data section) filled in."""
    check_schedule(cfg)
    cfg = resolve_kept_checkpoints(cfg)
    facts = check_model_config(cfg)
    cfg = replace_keys(cfg, {"model.image_size": facts.image_size})
    check_pair(cfg, facts)
    check_compile(cfg.train.compile)
    loss_arguments(cfg.loss)
    cfg = dataclasses.replace(cfg, data=resolve_data_config(resolve_text(cfg.data, facts), must_exist=True))
    check_cache(cfg)
    check_zeroshot(cfg.eval.classification)
    check_watched_metrics(cfg)
    check_tensorboard(cfg)
    return cfg


def load_config(name: str = "demo", overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Resolve a preset name or YAML path, then the overrides, into a config checked in full."""
    return validate(parse_config(name, overrides))


def parse_config(name: str = "demo", overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The preset or YAML with the overrides, every key known and every value of its type and range;
    nothing resolved or looked up yet (files, towers): :func:`validate` does that."""
    ours, original = split_flags(overrides)
    draft = read_config(name, ours)
    apply_flags(draft.values, original, explicit=dict(parse_override(text)[:2] for text in ours))
    cfg = parse(ExperimentConfig, draft.values, source=f"config {name}")
    return dataclasses.replace(cfg, config_name=draft.name, extras=draft.extras)


def config_from_dict(values: dict) -> ExperimentConfig:
    """A config a run saved (its checkpoint, its export): the user's added keys kept, nothing resolved again."""
    values = dict(values)
    name = values.pop("config_name", "custom")
    extras: dict = {}
    cfg = parse(ExperimentConfig, values, extras=extras, source="the saved config")
    return dataclasses.replace(cfg, config_name=name, extras=extras)
